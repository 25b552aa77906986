"""Context parallelism benchmark: per-device peak memory and time of each strategy vs unsharded.

Runs on simulated host devices by default (``--devices 8`` sets
``--xla_force_host_platform_device_count`` before jax is imported); on a real multi-device host
pass ``--devices 0`` to use the devices present. Memory is the compiled executable's own
per-device estimate (``compiled.memory_analysis()``: arguments + outputs + temporaries - aliased),
so it needs no run; time is the median of ``--repeats`` runs after one warm-up.

    python benchmarks/context_parallel.py --length 8192 --heads 8 --head-dim 64
    python benchmarks/context_parallel.py --length 16384 --memory-only --tiles 128,128

Prints one markdown table row per configuration with the ratio to the unsharded dense reference
and to the unsharded chunked (memory-efficient) computation, and the max |error| against the
unsharded reference output and gradients.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--mode", choices=["fwd", "fwd_bwd"], default="fwd_bwd")
    p.add_argument("--strategies", default="all_gather,ring,ring+zigzag,ulysses")
    p.add_argument("--skip-time", action="store_true", help="memory and error only")
    p.add_argument("--memory-only", action="store_true", help="compile only: no run, no error")
    p.add_argument("--tiles", default=None, metavar="BQ,BKV",
                   help="tile sizes of the per-device xla_chunked call (default: its defaults)")
    return p.parse_args()


ARGS = _parse()
if ARGS.devices:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.devices}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn.parallel import context_parallel_attention, make_mesh  # noqa: E402


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def make_fn(attn, mode):
    if mode == "fwd":
        return attn

    def fwd_bwd(q, k, v, w):
        def loss(q, k, v):
            return jnp.sum(attn(q, k, v) * w)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return fwd_bwd


def measure(fn, args, in_shardings=None):
    jitted = jax.jit(fn, in_shardings=in_shardings)
    compiled = jitted.lower(*args).compile()
    mem = peak_bytes(compiled)
    if ARGS.memory_only:
        return mem, float("nan"), None
    out = jax.block_until_ready(compiled(*args))
    times = []
    if not ARGS.skip_time:
        for _ in range(ARGS.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
    return mem, (float(np.median(times)) if times else float("nan")), out


def max_err(a, b):
    if a is None or b is None:
        return float("nan")
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
               for x, y in zip(la, lb, strict=True))


def main():
    a = ARGS
    causal = not a.no_causal
    r = np.random.default_rng(0)
    shape_q = (a.batch, a.length, a.heads, a.head_dim)
    shape_k = (a.batch, a.length, a.kv_heads, a.head_dim)
    q = jnp.asarray(r.normal(size=shape_q), jnp.float32)
    k = jnp.asarray(r.normal(size=shape_k), jnp.float32)
    v = jnp.asarray(r.normal(size=shape_k), jnp.float32)
    w = jnp.asarray(r.normal(size=shape_q), jnp.float32)
    args = (q, k, v) if a.mode == "fwd" else (q, k, v, w)
    ndev = len(jax.devices())
    print(f"# {jax.devices()[0].platform} x{ndev}, jax {jax.__version__}, B={a.batch} "
          f"T=S={a.length} N={a.heads} K={a.kv_heads} H={a.head_dim} f32 causal={causal} "
          f"mode={a.mode}; unsharded logits would be "
          f"{a.batch * a.heads * a.length**2 * 4 / 2**30:.2f} GiB")
    print("| run | per-device peak MiB | vs dense | vs chunked | time s | max abs err |")
    print("|---|---|---|---|---|---|")

    def unsharded(impl):
        return make_fn(lambda q, k, v: jaxattn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=impl), a.mode)

    dense_mem, dense_t, dense_out = measure(unsharded("reference"), args)
    chunk_mem, chunk_t, chunk_out = measure(unsharded("xla_chunked"), args)
    rows = [("unsharded reference (dense)", dense_mem, dense_t,
             float("nan") if a.memory_only else 0.0),
            ("unsharded xla_chunked", chunk_mem, chunk_t, max_err(chunk_out, dense_out))]
    mesh = make_mesh(context=ndev)
    seq = NamedSharding(mesh, P(None, "context"))
    local = "xla_chunked"
    if a.tiles:
        bq, bk = (int(x) for x in a.tiles.split(","))
        local = jaxattn.Implementation("xla_chunked", block_q=bq, block_kv=bk)
        print(f"# per-device attention: {local}")
    for name in a.strategies.split(","):
        strategy, _, lb = name.partition("+")
        attn = lambda q, k, v, s=strategy, lb=lb or None: context_parallel_attention(
            q, k, v, mesh=mesh, strategy=s, is_causal=causal, load_balance=lb,
            implementation=local)
        mem, t, out = measure(make_fn(attn, a.mode), args, in_shardings=(seq,) * len(args))
        rows.append((f"{name} (context={ndev})", mem, t, max_err(out, dense_out)))
    for label, mem, t, err in rows:
        print(f"| {label} | {mem / 2**20:.1f} | {mem / dense_mem:.3f} | {mem / chunk_mem:.3f} "
              f"| {t:.3f} | {err:.2e} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
