"""Neighborhood attention: each implementation vs dense masked attention and the planner's ideal.

    python benchmarks/neighborhood.py              # all cases, forward only
    python benchmarks/neighborhood.py --grad       # forward + backward
    python benchmarks/neighborhood.py --cases 2d   # substring filter on case names
    python benchmarks/neighborhood.py --interleaved   # round-robin timing (see below)

Timing: by default each implementation is timed in a block of back-to-back runs (best of
``--repeats``). ``--interleaved`` instead alternates one run of each implementation per round and
reports each one's median over the rounds, so every call starts from the cache and allocator
state the other left behind (closer to a layer inside a model than a tight loop).

Baseline: ``jax.nn.dot_product_attention`` with the dense NA mask ``[L, L]`` (what one would write
without a neighborhood kernel). "ideal" is the planner's tile-level speed-up (GNA's analytical
model) for the given tiles; it bounds what a block-sparse kernel with those tiles can gain over
dense attention ("/ ideal" > 1 means the XLA path's finer query-tile/halo granularity beats it).
The Pallas kernel is only timed on GPU/TPU (on CPU it runs in interpret mode, which measures the
interpreter, not the kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.core import neighborhood as na_ref
from jaxattn.ops import neighborhood as na_ops
from jaxattn.ops import neighborhood_planner as planner
from jaxattn.train.metrics import best_seconds


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    heads: int
    head_dim: int
    tile: tuple[int, ...]  # planner tile (per dimension)
    dense: bool = True  # also time the dense masked baseline
    gpu_only: bool = False  # the spec's NATTEN workloads: too big for a CPU run


CASES = (
    Case("2d 64x64 k=7", (64, 64), (7, 7), (1, 1), 4, 32, (8, 8)),
    Case("2d 64x64 k=24 s=8 (strided, tile-aligned)", (64, 64), (24, 24), (8, 8), 4, 32, (8, 8)),
    Case("1d 16k k=1024", (16384,), (1024,), (1,), 1, 64, (128,)),
    Case("1d 16k k=1024 s=256 (strided)", (16384,), (1024,), (256,), 1, 64, (128,)),
    Case("1d 32k k=2048 (NATTEN profiler)", (32768,), (2048,), (1,), 1, 128, (128,),
         gpu_only=True),
    Case("FLUX-4K 256x256 k=80 s=16 (NATTEN: 10.6 ms)", (256, 256), (80, 80), (16, 16), 24, 128,
         (16, 16), dense=False, gpu_only=True),
)


def _with_grad(f):
    def loss(q, k, v):
        # a data-dependent cotangent: with sum(out) XLA constant-folds parts of the backward
        return jnp.sum(f(q, k, v).astype(jnp.float32) * v.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def _time_interleaved(fns, args, rounds):
    """Median seconds of each function over ``rounds`` rounds of one call of each, in turn."""
    for f in fns.values():
        jax.block_until_ready(f(*args))  # compile + warm up
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def run_case(c: Case, grad: bool, repeats: int, interleaved: bool = False):
    rng = np.random.default_rng(0)
    shape = (1, *c.spatial, c.heads, c.head_dim)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
    total = int(np.prod(c.spatial))
    kw = dict(stride=c.stride)
    impls = {"xla": lambda q, k, v: na_ops.neighborhood_attention(
        q, k, v, c.kernel_size, implementation="xla", **kw)}
    if jax.default_backend() in ("gpu", "tpu"):
        impls["pallas"] = lambda q, k, v: na_ops.neighborhood_attention(
            q, k, v, c.kernel_size, implementation="pallas", **kw)
    mask = jnp.asarray(na_ref.neighborhood_mask(c.spatial, c.kernel_size, stride=c.stride))

    def dense(q, k, v):
        flat = lambda x: x.reshape(1, total, c.heads, c.head_dim)
        out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=mask[None, None])
        return out.reshape(q.shape)

    fns = dict(impls)
    if c.dense:
        fns["dense masked"] = dense
    fns = {name: jax.jit(_with_grad(f) if grad else f) for name, f in fns.items()}
    if interleaved:
        rows = _time_interleaved(fns, (q, k, v), rounds=repeats)
    else:
        rows = {name: best_seconds(f, q, k, v, repeats=repeats) for name, f in fns.items()}
    plan = planner.plan_speedup(c.spatial, c.kernel_size, stride=c.stride, q_tile=c.tile,
                                kv_tile=c.tile)
    p = na_ref.normalize_params(c.spatial, c.kernel_size, 1, c.stride, False)
    xla_tile = na_ops.default_q_tile(c.spatial, p)
    axes = [planner.plan_axis(c.spatial[i], p.kernel_size[i], 1, p.stride[i], False, xla_tile[i])
            for i in range(len(c.spatial))]
    xla_logits = np.prod([a.num_tiles * a.q_tile * a.halo for a in axes])
    timing = "interleaved, median" if interleaved else "blocks, best"
    print(f"\n## {c.name}  (B=1, N={c.heads}, H={c.head_dim}, {'fwd+bwd' if grad else 'fwd'}, "
          f"{timing} of {repeats})")
    print(f"planner, {c.tile} tiles: {plan}")
    print(f"xla path: q_tile {xla_tile}, halo {tuple(a.halo for a in axes)}, computes "
          f"{total**2 / xla_logits:.2f}x fewer logits than dense")
    base = rows.get("dense masked")
    print(f"{'implementation':>14} | {'ms':>9} | {'x dense':>8} | {'/ ideal':>8}")
    for name, t in rows.items():
        sp = base / t if base else float("nan")
        print(f"{name:>14} | {1e3 * t:9.2f} | {sp:8.2f} | {sp / plan.ideal_speedup:8.2f}")
    return rows, plan


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grad", action="store_true", help="time forward + backward")
    ap.add_argument("--cases", default="", help="substring filter on case names")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--interleaved", action="store_true",
                    help="alternate the implementations run by run (median per implementation)")
    args = ap.parse_args()
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    for c in CASES:
        if c.gpu_only and jax.default_backend() != "gpu":
            continue
        if args.cases in c.name:
            run_case(c, args.grad, args.repeats, args.interleaved)


if __name__ == "__main__":
    main()
