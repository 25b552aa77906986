"""CPU benchmark of jaxattn.tensor_attention: exact paths vs the polynomial method, time and memory.

For n in {64, 128, 256, 512, 1024} (B=1, N=1, H=4, entries uniform in [-0.5, 0.5], non-causal,
f32): forward time (best of 3) and compiled peak memory (XLA's memory analysis: temporaries +
outputs) of ``implementation="reference"`` (the ``[n, n, n]`` pair enumeration; skipped where
its logits would exceed ``REFERENCE_LIMIT_BYTES``), ``"xla_chunked"`` (the baseline every ratio
is against) and ``"polynomial"`` at degrees 2 and 4; then the fitted exponent of time vs n
(issue 16: the exact path must scale as ``n^3``, the polynomial one as ``n^(1+o(1))``).

    python benchmarks/tensor_attention.py            # n up to 1024 (~3 min on 2 cores)
    python benchmarks/tensor_attention.py --quick    # n up to 256
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn.train.metrics import best_seconds, peak_bytes

REFERENCE_LIMIT_BYTES = 2 << 30
HEAD_DIM = 4


def _inputs(n: int):
    r = np.random.default_rng(0)
    qk = [r.uniform(-0.5, 0.5, (1, n, 1, HEAD_DIM)) for _ in range(3)]
    v = [r.standard_normal((1, n, 1, HEAD_DIM)) for _ in range(2)]
    return tuple(jnp.asarray(x, jnp.float32) for x in qk + v)


def _fn(impl: str, degree: int | None):
    if impl == "polynomial":
        # under jit the entries are traced, so the caller declares their bound (0.5 here)
        return lambda *a: jaxattn.tensor_attention(*a, implementation="polynomial",
                                                   polynomial_degree=degree, entry_bound=0.5)
    return lambda *a: jaxattn.tensor_attention(*a, implementation=impl)


def _measure(fn, args, reps: int = 3) -> tuple[float, int]:
    compiled = jax.jit(fn).lower(*args).compile()
    return best_seconds(compiled, *args, repeats=reps), peak_bytes(compiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    lengths = (64, 128, 256) if args.quick else (64, 128, 256, 512, 1024)
    candidates = [("xla_chunked", None), ("reference", None), ("polynomial", 2),
                  ("polynomial", 4)]
    rows = []
    for n in lengths:
        x = _inputs(n)
        exact = None
        for impl, degree in candidates:
            name = impl if degree is None else f"{impl} g={degree}"
            if impl == "reference" and 4 * n**3 > REFERENCE_LIMIT_BYTES:
                rows.append(dict(n=n, impl=name, seconds=None, peak_mib=None))
                continue
            secs, peak = _measure(_fn(impl, degree), x)
            out = np.asarray(_fn(impl, degree)(*x))
            if exact is None:
                exact = out
            err = float(np.abs(out - exact).max())
            rows.append(dict(n=n, impl=name, seconds=secs, peak_mib=peak / 2**20, max_err=err))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| n | implementation | time (s) | time / xla_chunked | peak MiB | max err vs "
          "chunked |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["n"] == r["n"] and b["impl"] == "xla_chunked")
        if r["seconds"] is None:
            print(f"| {r['n']} | {r['impl']} | skipped (logits > 2 GiB) | | | |")
            continue
        print(f"| {r['n']} | {r['impl']} | {r['seconds']:.4f} | "
              f"{r['seconds'] / base['seconds']:.3g} | {r['peak_mib']:.1f} | "
              f"{r['max_err']:.1e} |")
    print()
    for name in ("xla_chunked", "polynomial g=2", "polynomial g=4"):
        pts = [(r["n"], r["seconds"]) for r in rows if r["impl"] == name]
        slope = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]
        print(f"fitted exponent of time vs n, {name}: {slope:.2f}")


if __name__ == "__main__":
    main()
