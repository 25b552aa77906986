"""``context_parallel_attention`` / ``head_parallel_attention`` as the NNX layer's attention_fn,
with parameters placed by the logical rules: equal to the unsharded layer, value and grads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, F32_GRAD_ATOL
from flax import nnx

from jaxattn.nn import MultiHeadAttention
from jaxattn.parallel import (
    axis_rules,
    constrain,
    context_parallel_attention,
    head_parallel_attention,
    make_mesh,
    state_shardings,
)


def _layer(attention_fn):
    kw = {} if attention_fn is None else dict(attention_fn=attention_fn)
    return MultiHeadAttention(num_heads=4, in_features=16, num_kv_heads=2, is_causal=True,
                              rope_theta=10_000.0, use_sinks=True, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("which", ["ring", "heads"])
def test_layer_with_sharded_attention_fn(which):
    if which == "heads":
        mesh = make_mesh(data=2, tensor=4)
        fn = functools.partial(head_parallel_attention, mesh=mesh)
    else:
        mesh = make_mesh(data=2, context=4)
        fn = functools.partial(context_parallel_attention, mesh=mesh, strategy=which)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 16)), jnp.float32)
    base, sharded = _layer(None), _layer(fn)
    graph, params = nnx.split(sharded)
    params = jax.device_put(params, state_shardings(params, mesh))

    def loss(params, x, graph):
        model = nnx.merge(graph, params)
        y = model(constrain(x, ("batch", "length", "embed")))
        return jnp.sum(jnp.sin(y)), y

    with axis_rules(mesh):
        (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)(
            params, x, graph)
    gb, pb = nnx.split(base)
    (_, y_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(pb, x, gb)
    np.testing.assert_allclose(y, y_ref, atol=F32_ATOL, rtol=0)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_ATOL, rtol=0)
