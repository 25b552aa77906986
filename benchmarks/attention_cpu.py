"""CPU benchmark of jaxattn.dot_product_attention implementations vs jax.nn.dot_product_attention.

For L in {1024, 4096, 16384}, causal and non-causal (B=1, N=8, H=64, f32): forward time and
compiled peak memory (XLA's memory analysis: temporaries + outputs) of each implementation,
printed as ratios to ``jax.nn.dot_product_attention`` measured in the same run. Then a
forward+backward run of ``xla_chunked`` at L=32768 (N=1, causal) in a fresh subprocess, reporting
its peak RSS.

Then (issue 14) forward+backward at L=4096 against jax.nn with GFLOP/s next to this machine's
plain f32 matmul rate measured in the same run; a block-sparse mask (256 x 256 blocks, 17%
density) against the unmasked call, with the tiles chosen from the mask and with the fixed
256 x 512 defaults; and a sliding window (256 keys of history) at growing L.

Targets: xla_chunked forward at L=4096 <= 0.5x the time of jax.nn (issue "Foundation");
fwd+bwd at L=4096 <= 0.35x of jax.nn non-causal, <= 0.25x causal; the block-sparse mask at
density d in <= 1.5 d of the dense time; the sliding window's time linear in L; L=32768 causal
fwd+bwd under 1.5 GiB peak RSS.

    python benchmarks/attention_cpu.py            # everything (~10-15 min on 2 cores)
    python benchmarks/attention_cpu.py --quick    # L=1024 forward only, plus the 32k memory run
    python benchmarks/attention_cpu.py --only fwd_bwd sparse window
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
import numpy as np

import jaxattn
from jaxattn import masks as M
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


def _qkv(length, heads=8, head_dim=64):
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(kk, (1, length, heads, head_dim), jnp.float32) for kk in keys)


def _grad_fn(attention):
    def loss(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(out * out)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def matmul_gflops(n=2048) -> float:
    """This machine's f32 ``[n, n] @ [n, n]`` rate: the physical limit the attention rates are
    compared with."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    return 2 * n**3 / best_seconds(mm, a, repeats=5) / 1e9


def bench_fwd_bwd(length=4096, heads=8, head_dim=64):
    """fwd+bwd time of xla_chunked / jax.nn, GFLOP/s (3.5x the forward's matmul FLOPs)."""
    peak = matmul_gflops()
    print(f"f32 matmul 2048^3 on this machine: {peak:.0f} GFLOP/s")
    q, k, v = _qkv(length, heads, head_dim)
    rows = []
    for causal in (False, True):
        flops = 3.5 * 4 * length * length * heads * head_dim * (0.5 if causal else 1.0)
        candidates = _candidates(causal)
        times = {name: best_seconds(_grad_fn(candidates[name]), q, k, v)
                 for name in ("jax.nn", "xla_chunked")}
        t, base = times["xla_chunked"], times["jax.nn"]
        target = 0.25 if causal else 0.35
        rows.append(dict(L=length, causal=causal, chunked_s=t, jax_nn_s=base, ratio=t / base,
                         gflops=flops / t / 1e9, matmul_gflops=peak))
        print(f"fwd+bwd L={length} causal={int(causal)}: xla_chunked {t * 1e3:.0f} ms, jax.nn "
              f"{base * 1e3:.0f} ms -> {t / base:.2f}x (target <= {target}x: "
              f"{'met' if t / base <= target else 'MISSED'}); {flops / t / 1e9:.0f} GFLOP/s = "
              f"{flops / t / 1e9 / peak:.0%} of the matmul rate", flush=True)
    return rows


def block_sparse_mask(length, block=256, density=0.17, seed=0):
    """Random ``block x block`` blocks kept with probability ``density`` (diagonal always kept,
    so no query row is fully masked)."""
    n = length // block
    keep = np.random.default_rng(seed).random((n, n)) < density
    np.fill_diagonal(keep, True)
    return M.ArrayMask(np.kron(keep, np.ones((block, block), bool)).astype(bool))


def _time_call(q, k, v, mask, tiles, backward):
    impl = "xla_chunked" if tiles is None else jaxattn.Implementation("xla_chunked", *tiles)

    def attention(q, k, v):
        return jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl)

    fn = _grad_fn(attention) if backward else jax.jit(attention)
    return best_seconds(fn, q, k, v)


def bench_sparse(length=4096):
    """Block-sparse mask time / unmasked time vs its density (target <= 1.5 d)."""
    q, k, v = _qkv(length)
    mask = block_sparse_mask(length)
    density = float(mask.array.mean())
    chosen = jaxattn.core.tile_choice.choose_tiles(mask, length, length, num_heads=8)
    rows = []
    for backward in (False, True):
        dense = _time_call(q, k, v, None, None, backward)
        for label, tiles in (("chosen " + "x".join(map(str, chosen)), None),
                             ("fixed 256x512", (256, 512))):
            t = _time_call(q, k, v, mask, tiles, backward)
            r = t / dense
            rows.append(dict(L=length, backward=backward, tiles=label, density=density,
                             time_s=t, dense_s=dense, ratio=r, ratio_over_density=r / density))
            verdict = "met" if r <= 1.5 * density else "MISSED"
            print(f"block-sparse L={length} d={density:.3f} {'fwd+bwd' if backward else 'fwd'} "
                  f"tiles {label}: {t * 1e3:.0f} ms / dense {dense * 1e3:.0f} ms = {r:.3f} = "
                  f"{r / density:.2f} d (target <= 1.5 d: {verdict})", flush=True)
    return rows


def bench_window(lengths=(1024, 4096, 16384), window=256):
    """Sliding-window (``LocalMask((window, 0))``) time per query: flat when linear in L."""
    rows = []
    for backward in (False, True):
        base = None
        for length in lengths:
            q, k, v = _qkv(length)
            t = _time_call(q, k, v, M.LocalMask((window, 0)), None, backward)
            per = t / length
            base = base or per
            rows.append(dict(L=length, backward=backward, time_s=t, per_query_us=per * 1e6,
                             per_query_vs_first=per / base))
            print(f"window {window} L={length:6d} {'fwd+bwd' if backward else 'fwd    '}: "
                  f"{t * 1e3:8.1f} ms, {per * 1e6:6.2f} us/query ({per / base:.2f}x of "
                  f"L={lengths[0]})", flush=True)
    return rows


SECTIONS = ("forward", "fwd_bwd", "sparse", "window", "long")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="L=1024 only")
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--only", nargs="*", choices=SECTIONS, default=None,
                    help="run these sections only (default: all; --quick: forward and long)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _fwd_bwd_child(args.child)
        return
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    sections = args.only or (("forward", "long") if args.quick else SECTIONS)
    if "forward" in sections:
        lengths = args.lengths or ([1024] if args.quick else [1024, 4096, 16384])
        rows = bench_forward(lengths)
        for r in rows:
            if r["L"] == 4096 and r["impl"] == "xla_chunked" and r["time_ratio"] is not None:
                verdict = "met" if r["time_ratio"] <= 0.5 else "MISSED"
                print(f"target xla_chunked fwd L=4096 causal={int(r['causal'])}: "
                      f"{r['time_ratio']:.2f}x of jax.nn (target <= 0.5x: {verdict})")
    if "fwd_bwd" in sections:
        bench_fwd_bwd()
    if "sparse" in sections:
        bench_sparse()
    if "window" in sections:
        bench_window()
    if "long" in sections:
        bench_long_fwd_bwd()


if __name__ == "__main__":
    main()
