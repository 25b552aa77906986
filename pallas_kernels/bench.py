"""Benchmark of the Pallas block-sparse flash attention over named workloads.

Workloads (``B, T=S, N, K, H`` from the command line):

* ``dense_causal``: causal attention.
* ``sliding_window_4k``: causal sliding window of 4096 keys (``T // 8`` with ``--small``).
* ``packed_12docs``: 12 documents of random lengths packed in each row, causal inside each
  document (segment ids + causal).
* ``random_blocks_10pct``: a random block-sparse mask keeping 10% of the ``block x block`` tiles.

FLOP convention (stated in the output): only tiles the kernel *computed* count, read from the
kernel's own visit counter (so packed documents count only the tiles whose segment id ranges
meet). Forward = ``2 * bq * bk * (H + Hv)`` per visited tile per (batch, head); forward+backward =
3.5x forward (FlashAttention convention: backward = 2.5x forward). Baselines are timed in the
same run and reported as the same useful FLOPs divided by their time, and as the speed ratio
``t_baseline / t_pallas`` (> 1 means the Pallas kernel is faster).

Baselines: ``jax.nn.dot_product_attention`` with ``implementation="xla"`` (and ``"cudnn"`` on
GPU; masks it cannot express are passed as boolean arrays, and a failure is reported), and
jaxattn's ``xla_chunked`` path.

    python -m pallas_kernels.bench --small            # CPU: tiny sizes, interpret mode
    python -m pallas_kernels.bench --seq 8192 --dtype bfloat16 --backward   # GPU / TPU

This script imports jaxattn for the baselines and the mask objects; it is a benchmark driver,
not part of the kernel package (which never imports jaxattn), and nothing imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

WORKLOADS = ("dense_causal", "sliding_window_4k", "packed_12docs", "random_blocks_10pct")


@dataclasses.dataclass(frozen=True)
class Workload:
    """A benchmark case: jaxattn mask/segment kwargs and the jax.nn equivalent."""

    name: str
    jaxattn_kw: dict
    jax_nn_kw: dict


def make_workload(name: str, b: int, t: int, block: int, small: bool, seed: int = 0) -> Workload:
    from jaxattn import masks as M

    r = np.random.default_rng(seed)
    if name == "dense_causal":
        return Workload(name, dict(is_causal=True), dict(is_causal=True))
    if name == "sliding_window_4k":
        w = t // 8 if small else 4096
        return Workload(name, dict(mask=M.LocalMask((w, 0))),
                        dict(is_causal=True, local_window_size=(w, 0)))
    if name == "packed_12docs":
        cuts = np.sort(r.choice(np.arange(1, t), size=(b, 11), replace=False), axis=1)
        ids = np.stack([np.searchsorted(c, np.arange(t), side="right") for c in cuts])
        ids = jnp.asarray(ids, jnp.int32)
        dense = (ids[:, :, None] == ids[:, None, :]) & jnp.tril(jnp.ones((t, t), bool))
        return Workload(name, dict(is_causal=True, query_segment_ids=ids),
                        dict(mask=dense[:, None]))
    if name == "random_blocks_10pct":
        nb = -(-t // block)
        keep = r.random((nb, nb)) < 0.10
        keep[np.arange(nb), np.arange(nb)] = True  # every query row sees at least its diagonal
        dense = np.kron(keep, np.ones((block, block), bool))[:t, :t]
        return Workload(name, dict(mask=M.ArrayMask(dense)), dict(mask=jnp.asarray(dense)))
    raise ValueError(f"unknown workload {name!r}; known: {WORKLOADS}")


def _time(fn, args, iters: int) -> float:
    """Median wall time (s) of ``fn(*args)`` after one compile+warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fwd_bwd(f):
    """``f(q, k, v) -> out`` to a jitted function computing out and all three gradients."""
    def loss(q, k, v):
        return jnp.sum(f(q, k, v).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def visited_tiles(q, k, v, wl: Workload, block: int) -> int:
    """Tiles the kernel computed, summed over batch and heads (from its visit counter)."""
    from jaxattn.ops.backends import pallas as pallas_backend
    from jaxattn.ops.call import make_call
    from pallas_kernels import flash

    call, _ = make_call(q, k, v, **wl.jaxattn_kw)
    cfg = dataclasses.replace(pallas_backend.flash_config_for(call, block, block),
                              count_visits=True)
    meta = pallas_backend.meta_for(call.mask, q.shape[1], k.shape[1], block, block)
    seg = {}
    if call.q_segment_ids is not None:
        seg = dict(q_segment_ids=call.q_segment_ids, kv_segment_ids=call.kv_segment_ids)
    _, _, visits = jax.jit(lambda q, k, v: flash.flash_attention(
        q, k, v, meta, config=cfg, **seg))(q, k, v)
    return int(np.asarray(visits).sum())


def run(args) -> list[dict]:
    import jaxattn
    from jaxattn.ops.backends import pallas as pallas_backend
    from jaxattn.ops.call import make_call

    platform = jax.default_backend()
    dtype = jnp.dtype(args.dtype)
    b, t, n, kh, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    blk = args.block
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(b, t, n, h)), dtype)
    k = jnp.asarray(r.normal(size=(b, t, kh, h)), dtype)
    v = jnp.asarray(r.normal(size=(b, t, kh, h)), dtype)
    rows = []
    for name in args.workloads:
        wl = make_workload(name, b, t, blk, args.small)
        tiles = visited_tiles(q, k, v, wl, blk)
        flops = tiles * 2.0 * blk * blk * (h + h) * (3.5 if args.backward else 1.0)

        def ours(q, k, v, wl=wl):
            call, _ = make_call(q, k, v, **wl.jaxattn_kw)
            return pallas_backend.run(call, blk, blk)[0]

        fns = {"pallas": ours,
               "xla_chunked": lambda q, k, v, wl=wl: jaxattn.dot_product_attention(
                   q, k, v, implementation="xla_chunked", **wl.jaxattn_kw),
               "jax.nn xla": lambda q, k, v, wl=wl: jax.nn.dot_product_attention(
                   q, k, v, implementation="xla", **wl.jax_nn_kw)}
        if platform == "gpu":
            fns["jax.nn cudnn"] = lambda q, k, v, wl=wl: jax.nn.dot_product_attention(
                q, k, v, implementation="cudnn", **wl.jax_nn_kw)
        times = {}
        for label, f in fns.items():
            fn = _fwd_bwd(f) if args.backward else jax.jit(f)
            try:
                times[label] = _time(fn, (q, k, v), args.iters)
            except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported
                times[label] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        total = b * n * (-(-t // blk)) ** 2
        row = dict(workload=name, visited_tiles=tiles, total_tiles=total, flops=flops)
        for label, tm in times.items():
            if isinstance(tm, str):
                row[label] = tm
                continue
            row[label] = dict(ms=tm * 1e3, tflops=flops / tm / 1e12)
            if label != "pallas" and not isinstance(times["pallas"], str):
                row[label]["speedup_of_pallas"] = tm / times["pallas"]
        rows.append(row)
    return rows


def _print(rows, args):
    mode = "fwd+bwd (3.5x fwd FLOPs)" if args.backward else "fwd"
    print(f"# device: {jax.devices()[0].device_kind} ({jax.default_backend()}); B={args.batch} "
          f"T=S={args.seq} N={args.heads} K={args.kv_heads} H={args.head_dim} {args.dtype} "
          f"block={args.block} {mode}")
    print("# TFLOP/s count only tiles the Pallas kernel computed (its visit counter); every "
          "implementation is credited with the same FLOPs. speedup = t_baseline / t_pallas.")
    for row in rows:
        print(f"{row['workload']}: visited {row['visited_tiles']}/{row['total_tiles']} tiles, "
              f"{row['flops'] / 1e9:.3f} GFLOP")
        for label in ("pallas", "jax.nn cudnn", "jax.nn xla", "xla_chunked"):
            if label not in row:
                continue
            m = row[label]
            if isinstance(m, str):
                print(f"  {label:>12}: {m}")
                continue
            extra = f"  speedup of pallas {m['speedup_of_pallas']:.2f}x" \
                if "speedup_of_pallas" in m else ""
            print(f"  {label:>12}: {m['ms']:9.3f} ms  {m['tflops']:8.4f} TFLOP/s{extra}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true",
                   help="tiny sizes for CPU (interpret mode): T=256, N=2, K=1, H=32, f32")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    args = p.parse_args(argv)
    if args.small:
        args.seq, args.heads, args.kv_heads, args.head_dim = 256, 2, 1, 32
        args.dtype, args.block, args.iters = "float32", 32, min(args.iters, 3)
    _print(run(args), args)


if __name__ == "__main__":
    main()
