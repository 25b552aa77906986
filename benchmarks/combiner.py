"""Combiner (Ren et al. 2021) vs full causal attention: compiled memory and time vs length.

    PYTHONPATH=. python benchmarks/combiner.py [--lengths 256,1024,4096] [--repeats 3]

For each length ``L`` (default 256 ... 16384), ``B=1, N=4, H=16`` float32, forward only:

* memory: ``jax.jit(f).lower(...).compile().memory_analysis()`` temp + output bytes (static, so
  it is reported even where the run is skipped);
* time: best of ``--repeats`` runs, only where the compiled temp memory is under
  ``--max-run-gib`` (otherwise "skipped: would not fit" is printed);
* the ratio full / Combiner, both measured in the same run.

Full attention is ``jaxattn.dot_product_attention(is_causal=True, implementation="reference")``,
the dense ``L x L`` path (the memory Combiner is compared against in the paper);
``"xla_chunked"`` is also listed, a memory-efficient exact path that Combiner's cost claims do not
address.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.nn import combiner as C
from jaxattn.train.metrics import best_seconds, peak_bytes

B, N, H = 1, 4, 16


def _fns():
    full = lambda impl: (lambda q, k, v: jaxattn.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl))
    comb = lambda var: (lambda q, k, v: C.combiner_attention(q, k, v, variant=var))
    return {"full (dense)": full("reference"), "full (xla_chunked)": full("xla_chunked"),
            "combiner_fixed": comb("fixed"), "combiner_logsparse": comb("logsparse"),
            "combiner_axial": comb("axial"), "combiner_mixture": comb("mixture")}


def measure(length: int, name: str, fn, repeats: int, max_run_bytes: float):
    """``{name, L, mem_mib, ms}`` (``ms`` None when skipped)."""
    args = [jax.random.normal(jax.random.key(i), (B, length, N, H), jnp.float32)
            for i in range(3)]
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    nbytes = peak_bytes(compiled)
    ms = None
    if mem.temp_size_in_bytes < max_run_bytes:
        ms = 1e3 * best_seconds(compiled, *args, repeats=repeats)
    return dict(name=name, L=length, mem_mib=nbytes / 2 ** 20, ms=ms)


def run(lengths, repeats: int = 3, max_run_gib: float = 1.0, verbose: bool = True):
    rows = []
    for length in lengths:
        for name, fn in _fns().items():
            row = measure(length, name, fn, repeats, max_run_gib * 2 ** 30)
            rows.append(row)
            if verbose:
                t = "skipped: would not fit" if row["ms"] is None else f"{row['ms']:.2f} ms"
                print(f"L={length:6d} {name:20s} mem {row['mem_mib']:10.2f} MiB  {t}",
                      flush=True)
    return rows


def ratios(rows):
    """Per length: dense-full / Combiner ratios of memory and time (time None if skipped)."""
    out = []
    for length in sorted({r["L"] for r in rows}):
        at = {r["name"]: r for r in rows if r["L"] == length}
        full = at["full (dense)"]
        for name in (n for n in at if n.startswith("combiner")):
            c = at[name]
            out.append(dict(L=length, name=name, mem_ratio=full["mem_mib"] / c["mem_mib"],
                            time_ratio=None if full["ms"] is None or c["ms"] is None
                            else full["ms"] / c["ms"]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="256,1024,4096,16384")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-run-gib", type=float, default=1.0)
    a = p.parse_args()
    rows = run([int(x) for x in a.lengths.split(",")], a.repeats, a.max_run_gib)
    print("\nfull (dense) / combiner:")
    for r in ratios(rows):
        t = "-" if r["time_ratio"] is None else f"{r['time_ratio']:.1f}x"
        print(f"L={r['L']:6d} {r['name']:20s} memory {r['mem_ratio']:8.1f}x  time {t}")


if __name__ == "__main__":
    main()
