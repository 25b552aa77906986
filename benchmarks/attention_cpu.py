"""CPU benchmark of jaxattn.dot_product_attention implementations vs jax.nn.dot_product_attention.

For L in {1024, 4096, 16384}, causal and non-causal (B=1, N=8, H=64, f32): forward time and
compiled peak memory (XLA's memory analysis: temporaries + outputs) of each implementation,
printed as ratios to ``jax.nn.dot_product_attention`` measured in the same run. Then a
forward+backward run of ``xla_chunked`` at L=32768 (N=1, causal) in a fresh subprocess, reporting
its peak RSS.

Targets (issue "Foundation"): xla_chunked forward at L=4096 <= 0.5x the time of jax.nn; L=32768
causal fwd+bwd under 1.5 GiB peak RSS.

    python benchmarks/attention_cpu.py            # full run (~5-10 min on 2 cores)
    python benchmarks/attention_cpu.py --quick    # L=1024 only, plus the 32k memory run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.train.metrics import best_seconds, peak_bytes

# Dense paths materialise [N, L, L] f32 logits several times over; above this compiled size we
# report the memory XLA asks for and do not run them (the machine has 24 GiB).
RUN_LIMIT_BYTES = 6 << 30


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def _candidates(causal: bool):
    def nn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal)

    def ours(impl):
        return lambda q, k, v: jaxattn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=impl
        )

    return {"jax.nn": nn, "reference": ours("reference"), "xla_chunked": ours("xla_chunked")}


def bench_forward(lengths, heads=8, head_dim=64):
    rows = []
    for length in lengths:
        shape = (1, length, heads, head_dim)
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
        for causal in (False, True):
            base_t = base_m = None
            for name, fn in _candidates(causal).items():
                compiled = _compiled(fn, q, k, v)
                mem = peak_bytes(compiled)
                t = best_seconds(compiled, q, k, v, repeats=2 if length > 4096 else 3) if (
                    mem <= RUN_LIMIT_BYTES) else None
                if name == "jax.nn":
                    base_t, base_m = t, mem
                flops = 4 * length * length * heads * head_dim * (0.5 if causal else 1.0)
                rows.append(dict(
                    L=length, causal=causal, impl=name, time_s=t, peak_mib=mem / 2**20,
                    gflops=None if t is None else flops / t / 1e9,
                    time_ratio=None if (t is None or base_t is None) else t / base_t,
                    mem_ratio=mem / base_m,
                ))
                _print_row(rows[-1])
    return rows


def _print_row(r):
    t = "skipped (memory)" if r["time_s"] is None else f"{r['time_s'] * 1e3:9.1f} ms"
    tr = "   n/a" if r["time_ratio"] is None else f"{r['time_ratio']:6.2f}x"
    gf = "    " if r["gflops"] is None else f"{r['gflops']:6.1f}"
    print(f"L={r['L']:6d} causal={int(r['causal'])} {r['impl']:>12}: {t:>17}  "
          f"time/jax.nn {tr}  {gf} GFLOP/s  peak {r['peak_mib']:9.1f} MiB  "
          f"mem/jax.nn {r['mem_ratio']:6.3f}x", flush=True)


def _peak_rss_mib() -> float:
    """This process's peak RSS. Linux's VmHWM belongs to the current address space; getrusage's
    ru_maxrss survives exec, so in a child it would include the forked parent's footprint."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _fwd_bwd_child(length: int) -> None:
    """Runs in a fresh process: causal fwd+bwd at ``length`` with N=1, prints peak RSS (MiB)."""
    shape = (1, length, 1, 64)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)

    def loss(q, k, v):
        out = jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation="xla_chunked")
        return jnp.sum(out * out)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    t0 = time.perf_counter()
    jax.block_until_ready(step(q, k, v))
    t1 = time.perf_counter()
    jax.block_until_ready(step(q, k, v))
    t2 = time.perf_counter()
    rss = _peak_rss_mib()
    print(json.dumps(dict(L=length, first_s=t1 - t0, second_s=t2 - t1, peak_rss_mib=rss)))


def bench_long_fwd_bwd(length=32768):
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(length)],
        check=True, capture_output=True, text=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    ok = res["peak_rss_mib"] < 1.5 * 1024
    print(f"fwd+bwd xla_chunked causal L={length} N=1 H=64: {res['second_s']:.2f} s "
          f"(first call incl. compile {res['first_s']:.2f} s), peak RSS "
          f"{res['peak_rss_mib']:.0f} MiB (target < 1536 MiB: {'met' if ok else 'MISSED'})")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="L=1024 only")
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _fwd_bwd_child(args.child)
        return
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    lengths = args.lengths or ([1024] if args.quick else [1024, 4096, 16384])
    rows = bench_forward(lengths)
    for r in rows:
        if r["L"] == 4096 and r["impl"] == "xla_chunked" and r["time_ratio"] is not None:
            verdict = "met" if r["time_ratio"] <= 0.5 else "MISSED"
            print(f"target xla_chunked fwd L=4096 causal={int(r['causal'])}: "
                  f"{r['time_ratio']:.2f}x of jax.nn (target <= 0.5x: {verdict})")
    bench_long_fwd_bwd()


if __name__ == "__main__":
    main()
