"""NNX neighborhood-attention layers and the NAT classifier."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn.models import HierarchicalClassifier, nat_config
from jaxattn.nn.neighborhood import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from jaxattn.ops.neighborhood import neighborhood_attention


@pytest.mark.parametrize("cls,shape,kw", [
    (NeighborhoodAttention1D, (2, 11, 12), dict(kernel_size=4, dilation=2, stride=2)),
    (NeighborhoodAttention2D, (2, 7, 6, 12), dict(kernel_size=(3, 2), is_causal=(False, True),
                                                  num_kv_heads=1, use_rpb=True)),
    (NeighborhoodAttention3D, (1, 4, 5, 3, 12), dict(kernel_size=(2, 3, 3), stride=(1, 3, 1))),
])
def test_layer_matches_projections_plus_functional(cls, shape, kw):
    layer = cls(12, 2, rngs=nnx.Rngs(0), **kw)
    # make the biases non-zero so a mistake in their handling shows
    layer.q_bias[...] = jnp.full(layer.q_bias.shape, 0.1)
    layer.kv_bias[...] = jnp.full(layer.kv_bias.shape, -0.2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    assert y.shape == shape
    q = x @ layer.q_kernel[...].reshape(12, -1) + layer.q_bias[...].reshape(-1)
    kvw = layer.kv_kernel[...]
    k = x @ kvw[0].reshape(12, -1) + layer.kv_bias[...][0].reshape(-1)
    v = x @ kvw[1].reshape(12, -1) + layer.kv_bias[...][1].reshape(-1)
    heads = lambda t, n: t.reshape(*shape[:-1], n, -1)
    nk = layer.num_kv_heads
    o = jax.jit(lambda q, k, v, rpb: neighborhood_attention(
        q, k, v, layer.kernel_size, dilation=layer.dilation, stride=layer.stride,
        is_causal=layer.is_causal, bias=rpb, implementation="reference"))(
        heads(q, 2), heads(k, nk), heads(v, nk), None if layer.rpb is None else layer.rpb[...])
    want = o.reshape(*shape[:-1], -1) @ layer.out_kernel[...].reshape(-1, 12)
    np.testing.assert_allclose(y, want + layer.out_bias[...], atol=1e-5, rtol=1e-5)


def test_causal_layer_never_sees_the_future():
    layer = NeighborhoodAttention2D(8, 2, 3, is_causal=(True, False), rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, 5, 8)), jnp.float32)
    x2 = x.at[:, 4:].set(7.0)  # change rows 4, 5 (the future of rows 0..3 along dim 0)
    y, y2 = nnx.jit(lambda m, x: m(x))(layer, jnp.concatenate([x, x2]))
    np.testing.assert_allclose(y[:4], y2[:4], atol=1e-6)
    assert not np.allclose(y[4:], y2[4:])


def test_layer_context_and_errors():
    layer = NeighborhoodAttention1D(8, 4, 3, num_kv_heads=2, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 9, 8))
    y = nnx.jit(lambda m, x, c: m(x, context=c))(layer, x, jnp.ones((2, 5, 8)))
    assert y.shape == (2, 9, 8)
    with pytest.raises(ValueError, match="spatial"):
        layer(jnp.ones((2, 9, 9, 8)))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        NeighborhoodAttention1D(8, 4, 3, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        NeighborhoodAttention1D(8, 2, 5, dilation=2, rngs=nnx.Rngs(0))(x)


def test_nat_classifier_learns_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = jnp.asarray(digits.images[:512] / 16.0, jnp.float32)  # [512, 8, 8]
    labels = jnp.asarray(digits.target[:512], jnp.int32)
    model = HierarchicalClassifier(nat_config(), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        # optax's Adam bias correction mixes int32 step counts with floats, which the suite's
        # strict promotion rejects; only the optimizer (not jaxattn code) runs under 'standard'.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(41):
        sl = slice((i % 4) * 128, (i % 4 + 1) * 128)
        params, opt_state, loss = step(params, opt_state, images[sl], labels[sl])
        losses.append(float(loss))
    # the same batch (0) before any update and after 40 updates (10 epochs of 4 batches)
    before, after = losses[0], losses[40]
    assert np.isfinite(after) and after < 0.6 * before, (before, after)
