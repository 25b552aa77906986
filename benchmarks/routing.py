"""CPU benchmark of routing attention (Roy et al., 2021) against full causal attention.

For each L (B = 1, N = 2 heads, H = 64, f32, causal, shared q/k), routing attention with
C = L / w clusters of w = 256 positions (every position in about one cluster, the paper's
C w ~ L) against ``jaxattn.dot_product_attention``
(``is_causal=True``) measured in the same run: forward time and compiled memory (XLA's memory
analysis, temporaries + outputs), printed as ratios routing / full. Routing's work is
``C w^2 = L w`` logits per head, full attention's ``L^2 / 2`` (causal kernels skip tiles).

    python benchmarks/routing.py            # L in 1024 .. 16384
    python benchmarks/routing.py --quick    # L in 1024, 4096
"""

from __future__ import annotations

import argparse

import jax

import jaxattn
from jaxattn.nn.routing import routing_attention, scale_free_layer_norm
from jaxattn.train.metrics import best_seconds, peak_bytes

N, H, WINDOW = 2, 64, 256


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    lengths = (1024, 4096) if ap.parse_args().quick else (1024, 4096, 16384)
    print(f"B=1 N={N} H={H} w={WINDOW} causal f32, {jax.devices()[0].platform}")
    print("L      C   full_ms  routing_ms  time_ratio  full_MiB  routing_MiB  mem_ratio")
    for length in lengths:
        c = length // WINDOW
        key = jax.random.split(jax.random.key(0), 3)
        q = scale_free_layer_norm(jax.random.normal(key[0], (1, length, N, H)))
        v = jax.random.normal(key[1], (1, length, N, H))
        mu = scale_free_layer_norm(jax.random.normal(key[2], (N, c, H)))
        full = _compiled(lambda q, v: jaxattn.dot_product_attention(q, q, v, is_causal=True),
                         q, v)
        rout = _compiled(lambda q, v, mu: routing_attention(q, q, v, mu, window=WINDOW,
                                                            is_causal=True), q, v, mu)
        tf, tr = best_seconds(full, q, v), best_seconds(rout, q, v, mu)
        mf, mr = peak_bytes(full), peak_bytes(rout)
        print(f"{length:<6d} {c:<3d} {tf * 1e3:8.2f} {tr * 1e3:10.2f} {tr / tf:10.3f} "
              f"{mf / 2**20:9.1f} {mr / 2**20:11.1f} {mr / mf:10.3f}", flush=True)


if __name__ == "__main__":
    main()
