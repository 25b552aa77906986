"""Tile sizes chosen from the mask's block structure (jaxattn.core.tile_choice)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks as M
from jaxattn.core import chunked, tile_choice


def _block_sparse(length, block, density, seed=0):
    """A boolean ``[L, L]`` mask of random ``block x block`` blocks at ``density``."""
    n = length // block
    blocks = np.random.default_rng(seed).random((n, n)) < density
    return M.ArrayMask(np.kron(blocks, np.ones((block, block), bool)).astype(bool))


MASKS = {
    "causal": M.CausalMask(),
    "local": M.LocalMask((200, 0)),
    "chunked_causal": M.ChunkedCausalMask(384),
    "prefix_lm": M.PrefixLMMask(300),
    "array256": _block_sparse(1024, 256, 0.3),
}


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("lengths", [(1024, 1024), (1000, 900)])
def test_coarse_kinds_derived_from_the_fine_grid_equal_block_info(name, lengths):
    """The candidate tilings' kinds, derived from the 128 x 128 grid, are exactly the kinds
    block_info computes at the coarse size (padding of unaligned lengths included)."""
    mask = MASKS[name]
    t, s = lengths
    if name == "array256" and lengths != (1024, 1024):
        mask = M.ArrayMask(mask.array[:t, :s])
    fine = mask.block_info(t, s, tile_choice.FINE, tile_choice.FINE).union_kind()
    for bq in tile_choice.CANDIDATES_Q:
        for bk in tile_choice.CANDIDATES_KV:
            f = tile_choice.FINE
            derived = tile_choice._coarse_kind(fine, bq // f, bk // f, s, bk)
            direct = mask.block_info(t, s, bq, bk).union_kind()
            np.testing.assert_array_equal(derived, direct, err_msg=f"{name} {bq}x{bk}")


def test_block_sparse_masks_get_tiles_aligned_to_their_blocks():
    assert tile_choice.choose_tiles(_block_sparse(4096, 256, 0.17), 4096, 4096,
                                    num_heads=8) == (256, 256)
    assert tile_choice.choose_tiles(_block_sparse(4096, 128, 0.17), 4096, 4096,
                                    num_heads=8) == (128, 128)


def test_dense_structure_keeps_the_defaults_and_caller_sizes_win():
    default = (tile_choice.DEFAULT_BLOCK_Q, tile_choice.DEFAULT_BLOCK_KV)
    assert tile_choice.choose_tiles(None, 4096, 4096, num_heads=8) == default
    assert tile_choice.choose_tiles(M.CausalMask(), 4096, 4096, num_heads=8) == default
    sparse = _block_sparse(4096, 256, 0.17)
    assert tile_choice.choose_tiles(sparse, 4096, 4096, block_q=64, block_kv=96) == (64, 96)
    assert tile_choice.choose_tiles(sparse, 4096, 4096, block_q=256)[0] == 256
    assert tile_choice.choose_tiles(sparse, 100, 100) == default  # under two fine tiles


def test_chosen_tiling_never_costs_more_than_the_default_under_the_model():
    def cost(mask, tiles):  # per_cell 4.0 = 4 heads x (64 + 64) / 128, as choose_tiles sees it
        return tile_choice.tiling_cost(mask.block_info(2048, 2048, *tiles).num_visited, *tiles,
                                       4.0)

    default = (tile_choice.DEFAULT_BLOCK_Q, tile_choice.DEFAULT_BLOCK_KV)
    for seed in range(4):
        for block in (128, 256):
            mask = _block_sparse(2048, block, 0.2, seed)
            chosen = tile_choice.choose_tiles(mask, 2048, 2048, num_heads=4)
            assert cost(mask, chosen) <= cost(mask, default)
            assert chosen[0] <= block and chosen[1] <= block  # aligned to the blocks


def test_traced_mask_uses_the_defaults_and_still_runs():
    q = jnp.ones((1, 256, 1, 8))
    arr = jnp.asarray(_block_sparse(256, 128, 0.5).array)

    @jax.jit
    def f(arr):
        return chunked.chunked_attention(q, q, q, mask=M.ArrayMask(arr))

    assert f(arr).shape == q.shape  # a traced ArrayMask has no static structure: defaults


def test_outputs_and_gradients_with_chosen_tiles_match_the_reference():
    """A 128-block mask at L = 512 (8 heads of 64) gets 128 x 128 tiles; the result is the
    reference's."""
    mask = _block_sparse(512, 128, 0.4, seed=3)
    assert tile_choice.choose_tiles(mask, 512, 512, num_heads=8, head_dim=64) == (128, 128)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, 512, 8, 64), jnp.float32) for kk in keys)

    def loss(impl):
        def f(q, k, v):
            out = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
            return jnp.sum(jnp.sin(out)), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, out), grads = loss("xla_chunked")(q, k, v)
    (_, ref), ref_grads = loss("reference")(q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=5e-5)
