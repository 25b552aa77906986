"""Head (tensor) parallel attention equals the unsharded reference, including GQA with fewer kv
heads than devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, F32_GRAD_ATOL, rand_inputs

import jaxattn
from jaxattn import masks as M
from jaxattn.parallel import head_parallel_attention, make_mesh
from jaxattn.parallel.layout import expand_kv_heads


@pytest.mark.parametrize(
    "mesh_sizes,n,k,kind",
    [
        (dict(tensor=8), 8, 2, "causal"),  # K=2 < 8 devices: kv heads replicated
        (dict(data=2, tensor=4), 8, 1, "segments"),  # MQA
        (dict(data=4, tensor=2), 4, 4, "per_head"),
    ],
)
def test_matches_reference(mesh_sizes, n, k, kind):
    mesh = make_mesh(**mesh_sizes)
    b, t = 4, 24
    q, key, v = rand_inputs(seed=n + k, b=b, t=t, s=t, n=n, k=k, h=8)
    kw = {
        "causal": dict(is_causal=True, logits_soft_cap=3.0),
        "segments": dict(query_segment_ids=jnp.asarray(
            np.repeat(np.arange(3), 8)[None].repeat(b, 0), jnp.int32)),
        "per_head": dict(mask=M.MultiHeadMask((M.CausalMask(), M.LocalMask((2, 2)),
                                               M.FullMask(), M.LocalMask((0, 5))))),
    }[kind]
    sinks = jnp.linspace(-1.0, 1.0, n).astype(jnp.float32)
    got = functools.partial(head_parallel_attention, mesh=mesh, sinks=sinks, **kw)
    ref = functools.partial(jaxattn.dot_product_attention, implementation="reference",
                            sinks=sinks, **kw)
    w = jax.random.normal(jax.random.key(0), q.shape, jnp.float32)

    def vg(fn):
        loss = lambda q, k, v: (jnp.sum(fn(q, k, v) * w), fn(q, k, v))
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, key, v)

    (_, out), g = jax.jit(lambda: vg(got))()
    (_, out_r), g_r = vg(ref)
    np.testing.assert_allclose(out, out_r, atol=F32_ATOL, rtol=0)
    for a, b_ in zip(g, g_r, strict=True):
        np.testing.assert_allclose(a, b_, atol=F32_GRAD_ATOL, rtol=0)


def test_expand_kv_heads_keeps_grouping():
    q, k, v = rand_inputs(seed=0, b=1, t=8, s=8, n=8, k=2, h=4)
    k2, v2 = expand_kv_heads(k, v, 8, 8)
    assert k2.shape[2] == 8
    a = jaxattn.dot_product_attention(q, k, v, implementation="reference")
    b = jaxattn.dot_product_attention(q, k2, v2, implementation="reference")
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="lcm"):
        expand_kv_heads(k[:, :, :2], v[:, :, :2], 6, 4)  # N=6, K=2 over 4 devices


def test_heads_not_divisible():
    mesh = make_mesh(tensor=8)
    q, k, v = rand_inputs(seed=0, b=1, t=8, s=8, n=4, k=2, h=4)
    with pytest.raises(ValueError, match="not divisible by the size 8"):
        head_parallel_attention(q, k, v, mesh=mesh)
