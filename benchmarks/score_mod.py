"""ALiBi as a score function vs as a dense bias: compiled memory (and time where it fits) of
causal attention forward + backward against the sequence length.

    python benchmarks/score_mod.py [--lengths 1024,4096,32768] [--max-run-gib 1.0]

``B = 1, N = 4, H = 64`` float32, causal. Three programs per length, compiled from shapes only
(nothing is allocated unless it is run):

* ``xla_chunked`` + ``score_mod=jaxattn.score_mods.alibi`` (slopes get gradients): the bias is
  evaluated per tile, never stored;
* ``xla_chunked`` + the dense ALiBi bias ``[1, N, L, L]`` built inside the program (what a user
  without ``score_mod`` writes; ``dbias`` is not requested);
* ``reference`` + the dense bias.

Memory: XLA's temporaries + outputs (``jaxattn.train.metrics.peak_bytes``); time: best of 3
runs where the compiled memory is under ``--max-run-gib``. Ratios against the score_mod path
are measured in the same run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import score_mods
from jaxattn.train.metrics import best_seconds, peak_bytes

N, H = 4, 64


def _dense_alibi(slopes, length):
    i = jnp.arange(length)
    return (-slopes[:, None, None] * jnp.abs(i[:, None] - i[None, :]))[None]


def programs():
    def with_score_mod(q, k, v, slopes):
        out = jaxattn.dot_product_attention(q, k, v, is_causal=True, score_mod=score_mods.alibi,
                                            score_mod_args=(slopes,), implementation="xla_chunked")
        return jnp.sum(out)

    def dense_bias(impl):
        def fn(q, k, v, slopes):
            bias = _dense_alibi(slopes, q.shape[1])
            return jnp.sum(jaxattn.dot_product_attention(q, k, v, bias, is_causal=True,
                                                         implementation=impl))
        return fn

    return {"chunked + score_mod": with_score_mod, "chunked + dense bias": dense_bias(
        "xla_chunked"), "reference + dense bias": dense_bias("reference")}


def run(lengths, max_run_gib: float):
    rows = []
    for length in lengths:
        shapes = (jax.ShapeDtypeStruct((1, length, N, H), jnp.float32),) * 3 + (
            jax.ShapeDtypeStruct((N,), jnp.float32),)
        base = None
        for name, fn in programs().items():
            grad = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))
            compiled = grad.lower(*shapes).compile()
            mem = peak_bytes(compiled)
            ms = None
            if mem < max_run_gib * 2**30:
                args = [jax.random.normal(jax.random.key(i), s.shape) for i, s in
                        enumerate(shapes)]
                ms = 1e3 * best_seconds(compiled, *args)
            base = base or (mem, ms)
            rows.append((length, name, mem, ms, mem / base[0],
                         None if ms is None or base[1] is None else ms / base[1]))
            t = "not run" if ms is None else f"{ms:9.1f} ms"
            print(f"L={length:6d} {name:24s} {mem / 2**20:10.1f} MiB {t}", flush=True)
    print("\nL, program, MiB, ms, memory / score_mod, time / score_mod")
    for r in rows:
        fmt = lambda x, f: "-" if x is None else format(x, f)
        print(f"{r[0]}, {r[1]}, {r[2] / 2**20:.1f}, {fmt(r[3], '.1f')}, {r[4]:.2f}, "
              f"{fmt(r[5], '.2f')}")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,4096,32768")
    p.add_argument("--max-run-gib", type=float, default=1.0)
    a = p.parse_args()
    run([int(x) for x in a.lengths.split(",")], a.max_run_gib)


if __name__ == "__main__":
    main()
