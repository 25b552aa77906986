"""Interpret-mode twins: the fused Pallas NA kernel vs the reference (values, LSE, gradients)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from test_neighborhood_xla import CASES, check_bf16, check_forward, check_grads, random_case

from jaxattn.core.neighborhood import normalize_params
from jaxattn.ops.neighborhood import neighborhood_attention, pallas_tables
from jaxattn.ops.neighborhood_planner import plan_speedup


def _no_bias(c):  # the kernel has no RPB; the adapter refuses it (tested below)
    return dataclasses.replace(c, bias=False)


FWD_CASES = ["1d-dil-not-divisible", "1d-stride-eq-kernel-causal",
             "2d-13x11-mixed-causal-gqa-extra", "2d-even-full-dim", "3d-6x7x5-mixed",
             "3d-6x7x5-causal-blocked-extra"]


@pytest.mark.parametrize("name", FWD_CASES)
def test_pallas_forward(name):
    check_forward("pallas", _no_bias(CASES[name]))


@pytest.mark.parametrize("name", ["2d-13x11-mixed-causal-gqa-extra", "3d-6x7x5-mixed"])
def test_pallas_grads(name):
    check_grads("pallas", _no_bias(CASES[name]))


def test_pallas_bf16():
    check_bf16("pallas", _no_bias(CASES["2d-13x11-mixed-causal-gqa-extra"]))


def test_pallas_refuses_bias_with_reason():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="relative-position bias"):
        neighborhood_attention(q, q, q, 3, bias=jnp.zeros((2, 5)), implementation="pallas")


@pytest.mark.parametrize("spatial,kernel,stride,tile,perfect", [
    # stride = tile and k an odd multiple of the tile (STA-like): windows are tile-aligned
    ((64,), 24, 8, (8,), True),
    ((32, 24), 12, 4, (4, 4), True),
    ((64,), 16, 8, (8,), False),  # start = 8g - 4: not aligned
    ((13, 11), (3, 4), (2, 4), (4, 4), False),
])
def test_pallas_tables_visit_exactly_the_planned_tiles(spatial, kernel, stride, tile, perfect):
    p = normalize_params(spatial, kernel, 1, stride, False)
    t = pallas_tables(spatial, p, tile)
    plan = plan_speedup(spatial, kernel, stride=stride, q_tile=tile, kv_tile=tile)
    assert int(t["table"][:, 0].sum()) == plan.visited_tiles == int(t["table_t"][:, 0].sum())
    # every (query, key) pair of the mask lies in a visited tile: check on the permuted layout
    blk = t["block"]
    qs, qe, kc = t["q_start"], t["q_end"], t["k_coord"]
    allowed = np.all((kc[None, :, :] >= qs[:, None, :]) & (kc[None, :, :] < qe[:, None, :]), -1)
    visited = np.zeros((len(t["table"]), len(t["table"])), bool)
    for i, row in enumerate(t["table"]):
        visited[i, row[1:1 + row[0]]] = True
    tiles_needed = allowed.reshape(len(visited), blk, len(visited), blk).any((1, 3))
    assert not (tiles_needed & ~visited).any()
    full = allowed.reshape(len(visited), blk, len(visited), blk).all((1, 3))
    assert plan.perfectly_block_sparse == perfect == bool(full[visited].all())


@pytest.mark.parametrize("seed", range(6))
def test_pallas_random_sweep(seed):
    check_forward("pallas", _no_bias(random_case(seed)))
