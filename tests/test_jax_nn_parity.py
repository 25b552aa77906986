"""``jaxattn.dot_product_attention`` is a drop-in for ``jax.nn.dot_product_attention``: every
jax.nn argument (``bias``, ``mask``, ``scale``, ``is_causal``, ``query_seq_lengths``,
``key_value_seq_lengths``, ``local_window_size`` as int or pair, ``implementation="xla"``,
``return_residual``) gives jax.nn's outputs, residual and gradients, except on purpose for rows
that see no key (zeros here, the mean of the values in jax.nn)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from tests.attention_testing import F32_ATOL, F32_GRAD_ATOL, jit_for_tests, max_err

B, T, S, N, K, H = 2, 9, 11, 4, 2, 8


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(r.normal(size=(B, S, K, H)), jnp.float32)
    v = jnp.asarray(r.normal(size=(B, S, K, H)), jnp.float32)
    bias = jnp.asarray(r.normal(size=(1, N, T, S)), jnp.float32)
    mask = jnp.asarray(r.random((B, 1, T, S)) < 0.8)
    q_len = jnp.asarray([5, T], jnp.int32)
    kv_len = jnp.asarray([7, S], jnp.int32)
    return q, k, v, bias, mask, q_len, kv_len


def _visible_rows(mask, q_len, kv_len, causal, window):
    """``[B, T, N]`` bool: rows that see at least one key (the only rows jax.nn and jaxattn
    agree on by design), from the same rules evaluated in NumPy."""
    qi, kj = np.arange(T)[:, None], np.arange(S)[None, :]
    ok = np.asarray(mask)[:, 0] & (kj < np.asarray(kv_len)[:, None, None])
    if causal:
        ok = ok & (kj <= qi)
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        ok = ok & (kj >= qi - left) & (kj <= qi + right)
    rows = ok.any(-1) & (qi[None, :, 0] < np.asarray(q_len)[:, None])
    return np.broadcast_to(rows[..., None], (B, T, N))


def _pair(fn, causal, window, keep):
    """``(out, residual)`` and the gradients of a fixed projection of ``out * keep`` (rows with
    no visible key excluded: there the two libraries differ on purpose), as one jitted
    program."""
    w = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, N, H)), jnp.float32) * keep

    def run(q, k, v, bias, mask, q_len, kv_len):
        return fn(q, k, v, bias, mask, scale=0.3, is_causal=causal, query_seq_lengths=q_len,
                  key_value_seq_lengths=kv_len, local_window_size=window,
                  return_residual=True)

    def loss(q, k, v, bias, *rest):
        out, _ = run(q, k, v, bias, *rest)
        return jnp.sum(out * w)

    both = lambda *a: (run(*a), jax.grad(loss, argnums=(0, 1, 2, 3))(*a))
    return jit_for_tests(both)


def _ours(*args, **kw):
    return jaxattn.dot_product_attention(*args, implementation="xla", **kw)


@pytest.mark.parametrize("window", [None, 3, (2, 1)], ids=["no_window", "w3", "w2_1"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_every_jax_nn_argument_matches(causal, window):
    args = _inputs()
    rows = _visible_rows(args[4], args[5], args[6], causal, window)
    assert rows.any() and not rows.all()  # both kinds of row occur
    keep = jnp.asarray(rows[..., None], jnp.float32)
    (out_nn, res_nn), grads_nn = _pair(jax.nn.dot_product_attention, causal, window, keep)(*args)
    (out, res), grads = _pair(_ours, causal, window, keep)(*args)
    out_nn, out = np.asarray(out_nn), np.asarray(out)
    assert max_err(out[rows], out_nn[rows]) < F32_ATOL
    assert max_err(np.asarray(res)[rows], np.asarray(res_nn)[rows]) < F32_ATOL
    # the documented difference: a row with no visible key is zero here (jax.nn: mean of V)
    assert np.all(out[~rows] == 0.0) and np.all(np.asarray(res)[~rows] == -np.inf)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), grads, grads_nn, strict=True):
        assert max_err(a, b) < F32_GRAD_ATOL, name


def test_xla_alias_lengths_without_the_other_and_window_as_int():
    q, k, v, *_ = _inputs()
    q_len = jnp.asarray([4, 6], jnp.int32)
    want = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=q_len, local_window_size=2)
    got = jaxattn.dot_product_attention(q, k, v, query_seq_lengths=q_len, local_window_size=2)
    assert max_err(got, want) < F32_ATOL
    kv_len = jnp.asarray([3, 8], jnp.int32)
    want = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_len,
                                        implementation="xla")
    got = jaxattn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_len,
                                        implementation="xla")
    assert max_err(got, want) < F32_ATOL
    assert jaxattn.masks.LocalMask(8).window == (8, 8)
    # traced scale: the chunked path refuses it, so "xla" runs the reference
    f = jax.jit(lambda s: jaxattn.dot_product_attention(q, k, v, scale=s, implementation="xla"))
    assert max_err(f(0.2), jax.nn.dot_product_attention(q, k, v, scale=0.2)) < F32_ATOL


def test_bad_lengths_name_the_argument():
    q, k, v, *_ = _inputs()
    with pytest.raises(ValueError, match=r"query_seq_lengths must be an int array of shape "
                                         r"\[B\] = \(2,\), got shape \(3,\)"):
        jaxattn.dot_product_attention(q, k, v, query_seq_lengths=jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match="key_value_seq_lengths must be an int array"):
        jaxattn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.ones(2, jnp.float32))
    with pytest.raises(TypeError, match="query_seq_lengths must be an int array"):
        jaxattn.dot_product_attention(q, k, v, query_seq_lengths=[3, 4])
    with pytest.raises(ValueError, match="LocalMask window"):
        jaxattn.dot_product_attention(q, k, v, local_window_size=(2, -1))
