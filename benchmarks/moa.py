"""CPU benchmark of MoA's heterogeneous elastic masks (Fu et al., 2024) against dense causal
attention: tiles visited and forward time vs length, ratios measured in the same run.

For each L (B = 1, N = 8 heads, H = 64, f32, causal) the plan below (the official code's
rounding: spans in multiples of 64, at least 128, a 64-token sink) is compared with
``jaxattn.dot_product_attention(is_causal=True)``:

* tiles visited per head (``Mask.block_info`` on 128 x 128 tiles, summed over heads: what the
  Pallas kernel visits, which reads per-head block metadata) over dense causal's;
* ``xla_chunked`` tiles (its schedule is the union over the heads of one call, at its default
  256 x 512 tiles) for one call with the per-head mask and for ``group_heads=True`` (one call
  per distinct span, as the code groups heads of equal cache size);
* forward time of those two ``xla_chunked`` paths over dense causal ``xla_chunked``.

    python benchmarks/moa.py            # L in 1024 .. 16384
    python benchmarks/moa.py --quick    # L in 1024, 4096
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import jaxattn
from jaxattn import masks
from jaxattn.core.chunked import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q
from jaxattn.nn import moa
from jaxattn.train.metrics import best_seconds

N, H, TILE = 8, 64, 128
# two dense heads, two at S = N/2, two at N/4, two at a fixed 256-token span
ALPHA = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 256.0, 256.0])
BETA = np.array([1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0])


def _chunked_tiles(mask, length: int, group: bool) -> int:
    """Tiles ``xla_chunked`` visits (union over the heads of each call) x heads per call."""
    bq, bk = min(DEFAULT_BLOCK_Q, length), min(DEFAULT_BLOCK_KV, length)
    if not group:
        kind = mask.block_info(length, length, bq, bk).union_kind()
        return int((kind != masks.EMPTY).sum()) * N
    total = 0
    for m in set(mask.masks):
        heads = sum(1 for x in mask.masks if x == m)
        total += heads * int((m.block_info(length, length, bq, bk).union_kind()
                              != masks.EMPTY).sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lengths = (1024, 4096) if args.quick else (1024, 4096, 8192, 16384)
    print(f"B=1 N={N} H={H} causal f32, {jax.devices()[0].platform}; plan alpha={ALPHA.tolist()}"
          f" beta={BETA.tolist()} (code rounding 64/128/64)")
    print("L      kv_dens  tiles128_ratio  chunk_ratio  chunk_grp_ratio  causal_ms  moa_ms  "
          "moa_grp_ms  time_ratio  grp_time_ratio")
    for length in lengths:
        key = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(x, (1, length, N, H)) for x in key)
        mask = moa.elastic_mask(ALPHA, BETA, length)
        spans = moa.elastic_spans(ALPHA, BETA, length)[0]
        per_head = mask.block_info(length, length, TILE, TILE).num_visited
        causal_tiles = masks.CausalMask().block_info(length, length, TILE, TILE).num_visited
        bq, bk = min(DEFAULT_BLOCK_Q, length), min(DEFAULT_BLOCK_KV, length)
        causal_chunk = N * int((masks.CausalMask().block_info(length, length, bq, bk)
                                .union_kind() != masks.EMPTY).sum())
        dense = jax.jit(lambda q, k, v: jaxattn.dot_product_attention(
            q, k, v, is_causal=True, implementation="xla_chunked"))
        one = jax.jit(lambda q, k, v: moa.moa_attention(
            q, k, v, ALPHA, BETA, implementation="xla_chunked"))
        grp = jax.jit(lambda q, k, v: moa.moa_attention(
            q, k, v, ALPHA, BETA, implementation="xla_chunked", group_heads=True))
        td, t1, tg = (best_seconds(f, q, k, v, repeats=args.repeats) for f in (dense, one, grp))
        print(f"{length:<6d} {spans.mean() / length:7.3f} "
              f"{per_head / (N * causal_tiles):15.3f} "
              f"{_chunked_tiles(mask, length, False) / causal_chunk:12.3f} "
              f"{_chunked_tiles(mask, length, True) / causal_chunk:16.3f} "
              f"{td * 1e3:10.2f} {t1 * 1e3:7.2f} {tg * 1e3:11.2f} {t1 / td:11.3f} "
              f"{tg / td:15.3f}", flush=True)


if __name__ == "__main__":
    main()
