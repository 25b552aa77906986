"""Attention dropout under context parallelism: every strategy, with batch / head sharding and
load balancing, drops exactly the entries the unsharded call drops for the same rng (the kept
pattern compared bit-for-bit), and outputs and gradients equal the unsharded reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, F32_GRAD_ATOL

import jaxattn
from jaxattn.core.dropout import DropoutIndex, dropout_seed
from jaxattn.ops.registry import Implementation
from jaxattn.parallel import context_parallel_attention, make_mesh

RATE = 0.25
B, T, N, K = 2, 32, 8, 2


def _one_hot_values():
    """``q = k = 0`` (uniform probabilities over the visible keys) and ``v[b, s, k] = e_s``:
    ``out[b, i, n, j] = keep_ij / ((i + 1) (1 - rate))`` under a causal mask, so the non-zero
    pattern of the output *is* the kept-entry pattern."""
    q = jnp.zeros((B, T, N, 8))
    k = jnp.zeros((B, T, K, 8))
    v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (B, T, K, T))
    return q, k, v


def _kept(out):
    return np.asarray(out) != 0  # [B, T, N, S]: which (query, key) entries survived


CASES = [  # strategy, mesh sizes, load balance
    ("all_gather", dict(context=8), None),
    ("all_gather", dict(tensor=2, context=4), "striped"),  # global-gather balancing, head axis
    ("ring", dict(data=2, context=4), None),
    ("ring", dict(context=8), "zigzag"),
    ("ring", dict(tensor=2, context=4), "zigzag"),
    ("ulysses", dict(context=8), None),
    ("ulysses", dict(data=2, context=4), None),
]


def _cp(strategy, sizes, balance, rng):
    return functools.partial(
        context_parallel_attention, is_causal=True, mesh=make_mesh(**sizes), strategy=strategy,
        load_balance=balance, dropout_rate=RATE, dropout_rng=rng, implementation="xla_chunked")


@pytest.mark.parametrize("strategy,sizes,balance", CASES)
def test_drops_exactly_the_entries_the_unsharded_call_drops(strategy, sizes, balance):
    rng = jax.random.key(3)
    q, k, v = _one_hot_values()
    ref = jaxattn.dot_product_attention(q, k, v, is_causal=True, dropout_rate=RATE,
                                        dropout_rng=rng, implementation="reference")
    got = jax.jit(_cp(strategy, sizes, balance, rng))(q, k, v)
    np.testing.assert_array_equal(_kept(got), _kept(ref))
    visible = np.broadcast_to(np.tril(np.ones((T, T), bool))[None, :, None, :], (B, T, N, T))
    dropped = visible.sum() - _kept(ref).sum()
    assert 0.15 < dropped / visible.sum() < 0.35  # the pattern is a real dropout mask
    np.testing.assert_allclose(got, ref, atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("strategy,sizes,balance", [CASES[1], CASES[4], CASES[6]])
def test_outputs_and_gradients_equal_the_unsharded_reference(strategy, sizes, balance):
    rng = jax.random.key(7)
    r = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(r[0], (B, T, N, 16))
    k, v = (jax.random.normal(x, (B, T, K, 16)) for x in r[1:])
    w = jax.random.normal(jax.random.key(9), q.shape)

    def value_and_grads(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), (0, 1, 2))(q, k, v)

    ref = functools.partial(jaxattn.dot_product_attention, is_causal=True, dropout_rate=RATE,
                            dropout_rng=rng, implementation="reference")
    (_, g_ref), (_, g) = value_and_grads(ref), jax.jit(
        lambda q, k, v: value_and_grads(_cp(strategy, sizes, balance, rng)))(q, k, v)
    for name, a, b in zip("qkv", g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_ATOL, rtol=0, err_msg=f"d{name}")
    out = jax.jit(_cp(strategy, sizes, balance, rng))(q, k, v)
    np.testing.assert_allclose(out, ref(q, k, v), atol=F32_ATOL, rtol=0)
    other = jax.jit(_cp(strategy, sizes, balance, jax.random.key(8)))(q, k, v)
    assert float(jnp.abs(other - out).max()) > 0.1  # another rng drops other entries


@pytest.mark.parametrize("impl", ["reference", Implementation("xla_chunked", 8, 16)],
                         ids=["reference", "xla_chunked"])
def test_dropout_index_makes_a_shard_drop_the_whole_calls_entries(impl):
    """A shard of a call (batch row 1, heads 2-3, eight permuted query rows, all keys) with its
    DropoutIndex drops what the whole call drops there."""
    rng = jax.random.key(5)
    q, k, v = _one_hot_values()
    full = jaxattn.dot_product_attention(q, k, v, dropout_rate=RATE, dropout_rng=rng,
                                         implementation="reference")
    rows = np.array([3, 17, 9, 30, 1, 0, 22, 11])
    index = DropoutIndex(dropout_seed(rng), num_heads=N, batch_start=1, head_start=2,
                         q_positions=jnp.asarray(rows))
    part = jaxattn.dot_product_attention(q[1:2, rows, 2:4], k[1:2, :, :1], v[1:2, :, :1],
                                         dropout_rate=RATE, dropout_index=index,
                                         implementation=impl)
    np.testing.assert_array_equal(_kept(part), _kept(full[1:2, rows, 2:4]))


def test_bad_dropout_index_and_unsupported_backends():
    q, k, v = _one_hot_values()
    seed = dropout_seed(jax.random.key(0))
    call = functools.partial(jaxattn.dot_product_attention, q, k, v, dropout_rate=RATE)
    with pytest.raises(ValueError, match="num_heads"):
        call(dropout_index=DropoutIndex(seed, num_heads=4))
    with pytest.raises(ValueError, match=r"q_positions must have shape \[32\]"):
        call(dropout_index=DropoutIndex(seed, num_heads=N, q_positions=jnp.arange(5)))
    with pytest.raises(TypeError, match="DropoutIndex"):
        call(dropout_index=(seed, 1))
    with pytest.raises(ValueError, match="dropout_index"):
        call(dropout_index=DropoutIndex(seed, num_heads=N), implementation="pallas")
