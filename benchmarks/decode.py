"""One decoding step against a long KV cache: ``jaxattn.decode_attention`` (tiles bounded by the
live index) vs the full-cache ``jaxattn.dot_product_attention`` call decoding used before.

    python benchmarks/decode.py [--cache 4096] [--indices 256,4095] [--block-kv 128,256,512]

``B = 4, T = 1, N = 8, K = 2, H = 128`` float32 (``--dtype bfloat16`` too). Every program is
jitted with the cache index traced (as in ``nnx.jit``-ed decoding), so one compiled program per
configuration serves every index: the full-cache call (``dot_product_attention`` with
``CausalMask(offset=index)``, the backend ``None`` picks here: the layer's old default), the same
with ``implementation="reference"``, and ``decode_attention`` for each ``--block-kv``. Time:
best of ``--repeats`` calls; tiles: the loop's own count (``decode_attention_with_stats``).
Ratios against the full-cache call at the same index are measured in the same run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import masks as M
from jaxattn.ops.decode import decode_attention_with_stats
from jaxattn.train.metrics import best_seconds

B, N, K, H = 4, 8, 2, 128


def full_cache_step(implementation=None):
    """Before: the whole cache through dot_product_attention (every key tile is visited), with
    the old layer's scalar cache index (every sequence at ``index[0]``)."""
    def step(q, k, v, index):
        return jaxattn.dot_product_attention(q, k, v, mask=M.CausalMask(offset=index[0]),
                                             implementation=implementation)
    return step


def bounded_step(block_kv: int):
    def step(q, k, v, index):
        res = decode_attention_with_stats(q, k, v, mask=M.CausalMask(offset=index),
                                          key_value_seq_lengths=index + 1, block_kv=block_kv)
        return res.out, res.tiles_visited
    return step


def run(cache: int, indices, blocks, dtype, repeats: int):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, 1, N, H), dtype)
    k = jax.random.normal(keys[1], (B, cache, K, H), dtype)
    v = jax.random.normal(keys[2], (B, cache, K, H), dtype)
    print(f"devices: {jax.devices()}  B={B} N={N} K={K} H={H} S_max={cache} {dtype.__name__}")
    print(f"full-cache backend: {jaxattn.explain(q, k, v, mask=M.CausalMask(offset=0))}")
    full = jax.jit(full_cache_step())
    dense = jax.jit(full_cache_step("reference"))
    bounded = {b: jax.jit(bounded_step(b)) for b in blocks}
    rows = []
    for index in indices:
        idx = jnp.full((B,), index, jnp.int32)
        base = 1e3 * best_seconds(full, q, k, v, idx, repeats=repeats)
        rows.append((index, "dot_product_attention (full cache)", "-", base, 1.0))
        ref = full(q, k, v, idx)
        ms = 1e3 * best_seconds(dense, q, k, v, idx, repeats=repeats)
        rows.append((index, "dot_product_attention reference (full cache)", "-", ms, ms / base))
        for b, fn in bounded.items():
            out, tiles = fn(q, k, v, idx)
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            ms = 1e3 * best_seconds(fn, q, k, v, idx, repeats=repeats)
            rows.append((index, f"decode_attention block_kv={b}", f"{int(tiles)}/{-(-cache // b)}",
                         ms, ms / base))
            print(f"index {index:5d} block {b:4d}: {ms:8.3f} ms (full {base:8.3f} ms), tiles "
                  f"{int(tiles)}, max |diff| vs full {err:.2e}", flush=True)
    print("\nindex, program, tiles visited / all, ms, time / full-cache call")
    for index, name, tiles, ms, ratio in rows:
        print(f"{index}, {name}, {tiles}, {ms:.3f}, {ratio:.2f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=int, default=4096)
    p.add_argument("--indices", default="256,4095")
    p.add_argument("--block-kv", default="128,256,512")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    run(a.cache, [int(x) for x in a.indices.split(",")], [int(x) for x in a.block_kv.split(",")],
        getattr(jnp, a.dtype), a.repeats)


if __name__ == "__main__":
    main()
