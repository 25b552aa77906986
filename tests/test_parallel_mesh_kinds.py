"""Every jaxattn.parallel entry point on the meshes users make: ``jax.make_mesh`` with Explicit
axes (its default), Auto axes and mixed, for unsharded and already-sharded inputs, eager, under
``jax.jit`` and inside ``jax.set_mesh``. Outputs and gradients equal the unsharded reference and
keep the sharding a user expects (sequence-sharded in, sequence-sharded out)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, F32_GRAD_ATOL
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxattn
from jaxattn.nn import MultiHeadAttention
from jaxattn.parallel import (
    axis_rules,
    constrain,
    context_parallel_attention,
    head_parallel_attention,
    state_shardings,
)

E, A = AxisType.Explicit, AxisType.Auto
KINDS = {"explicit": (E, E), "auto": (A, A), "mixed": (E, A), "mixed_rev": (A, E)}


def _mesh(kind, names=("data", "context"), shape=(2, 4)):
    return jax.make_mesh(shape, names, axis_types=KINDS[kind])


def _qkv(t=32, n=8, kv=2, seed=0):
    r = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(r[0], (2, t, n, 16))
    k, v = (jax.random.normal(x, (2, t, kv, 16)) for x in r[1:])
    return q, k, v


def _seq_sharded(mesh, *xs):
    sh = NamedSharding(mesh, P("data", "context"))
    return tuple(jax.device_put(x, sh) for x in xs)


def _value_and_grads(fn, q, k, v):
    w = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * w), out

    (_, out), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, g


def _reference(q, k, v, **kw):
    ref = functools.partial(jaxattn.dot_product_attention, implementation="reference", **kw)
    return _value_and_grads(ref, *(np.asarray(x) for x in (q, k, v)))


def _assert_close(got, want):
    (out, g), (out_r, g_r) = got, want
    np.testing.assert_allclose(out, out_r, atol=F32_ATOL, rtol=0)
    for name, a, b in zip("qkv", g, g_r, strict=True):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_ATOL, rtol=0, err_msg=f"d{name}")


def _spec(x):
    return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


@pytest.mark.parametrize("kind", ["explicit", "auto", "mixed"])
@pytest.mark.parametrize("strategy", ["all_gather", "ring", "ulysses"])
def test_context_parallel_on_every_mesh_kind(kind, strategy):
    mesh = _mesh(kind)
    q, k, v = _seq_sharded(mesh, *_qkv())
    fn = functools.partial(context_parallel_attention, is_causal=True, mesh=mesh,
                           strategy=strategy)
    got = jax.jit(functools.partial(_value_and_grads, fn))(q, k, v)
    _assert_close(got, _reference(q, k, v, is_causal=True))
    assert _spec(got[0])[:2] == ("data", "context")  # sequence-sharded in, sequence-sharded out


@pytest.mark.parametrize("placement", ["unsharded", "device_put", "reshard"])
def test_explicit_mesh_inputs_eager_jit_and_set_mesh(placement):
    """One ring call three ways (eager, jit, jit inside ``jax.set_mesh``) for inputs that are
    unsharded, placed with ``device_put`` or moved with ``jax.sharding.reshard``."""
    mesh = _mesh("explicit")
    q, k, v = _qkv()
    if placement == "device_put":
        q, k, v = _seq_sharded(mesh, q, k, v)
    elif placement == "reshard":
        with jax.set_mesh(mesh):
            q, k, v = (jax.sharding.reshard(x, P(None, "context")) for x in (q, k, v))
    fn = functools.partial(context_parallel_attention, is_causal=True, mesh=mesh,
                           strategy="ring")
    want = jaxattn.dot_product_attention(*(np.asarray(x) for x in (q, k, v)), is_causal=True,
                                         implementation="reference")
    with jax.set_mesh(mesh):
        outs = {"set_mesh": jax.jit(fn)(q, k, v)}
        _assert_close(jax.jit(functools.partial(_value_and_grads, fn))(q, k, v),
                      _reference(q, k, v, is_causal=True))
    outs.update(eager=fn(q, k, v), jit=jax.jit(fn)(q, k, v))
    for mode, out in outs.items():
        np.testing.assert_allclose(out, want, atol=F32_ATOL, rtol=0, err_msg=mode)
        assert _spec(out)[:2] == ("data", "context"), mode


@pytest.mark.parametrize("kind", ["explicit", "mixed_rev"])
@pytest.mark.parametrize("balance,t", [("zigzag", 32), ("striped", 40)],
                         ids=["zigzag_local", "striped_global_gather"])
def test_load_balancing_on_explicit_axes(kind, balance, t):
    """Shard-local relayout (zigzag) and the global-gather fallback (striped, T % P**2 != 0),
    whose gathers along the sequence need the sequence whole on Explicit meshes."""
    mesh = _mesh(kind)
    q, k, v = _seq_sharded(mesh, *_qkv(t=t))
    fn = functools.partial(context_parallel_attention, is_causal=True, mesh=mesh,
                           strategy="ring", load_balance=balance)
    got = jax.jit(functools.partial(_value_and_grads, fn))(q, k, v)
    _assert_close(got, _reference(q, k, v, is_causal=True))
    assert _spec(got[0])[:2] == ("data", "context")


@pytest.mark.parametrize("kind", ["explicit", "auto", "mixed"])
def test_head_parallel_on_every_mesh_kind(kind):
    mesh = _mesh(kind, names=("data", "tensor"))
    q, k, v = _qkv(kv=4)
    fn = functools.partial(head_parallel_attention, is_causal=True, mesh=mesh)
    got = jax.jit(functools.partial(_value_and_grads, fn))(q, k, v)
    _assert_close(got, _reference(q, k, v, is_causal=True))
    assert _spec(got[0]) == ("data", None, "tensor", None)


@pytest.mark.parametrize("kind", ["explicit", "mixed"])
def test_dot_product_attention_on_explicitly_sharded_inputs(kind):
    """The unsharded op on sequence-sharded Explicit inputs (Q K^T would be sharded twice over
    one axis): computed on Auto axes, returned sharded like the query."""
    mesh = _mesh(kind)
    q, k, v = _seq_sharded(mesh, *_qkv())
    fn = functools.partial(jaxattn.dot_product_attention, is_causal=True)
    got = jax.jit(functools.partial(_value_and_grads, fn))(q, k, v)
    _assert_close(got, _reference(q, k, v, is_causal=True))
    out, lse = fn(q, k, v, return_lse=True)
    assert out.sharding.spec[0] == "data" and lse.shape == q.shape[:3]


def _layer(attention_fn=None):
    kw = {} if attention_fn is None else dict(attention_fn=attention_fn)
    return MultiHeadAttention(num_heads=4, in_features=16, num_kv_heads=2, is_causal=True,
                              rope_theta=10_000.0, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("kind", ["explicit", "mixed"])
@pytest.mark.parametrize("which", ["local", "ring", "heads"])
def test_layer_logical_constraints_on_every_mesh_kind(kind, which):
    """``MultiHeadAttention`` under ``axis_rules`` with parameters placed by ``state_shardings``:
    forward and parameter gradients equal the unsharded layer's."""
    names = ("data", "tensor") if which == "heads" else ("data", "context")
    mesh = _mesh(kind, names=names)
    fn = {"local": None,
          "ring": functools.partial(context_parallel_attention, mesh=mesh, strategy="ring"),
          "heads": functools.partial(head_parallel_attention, mesh=mesh)}[which]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 16)), jnp.float32)
    graph, params = nnx.split(_layer(fn))
    params = jax.device_put(params, state_shardings(params, mesh))

    def loss(params, x, graph):
        y = nnx.merge(graph, params)(constrain(x, ("batch", "length", "embed")))
        return jnp.sum(jnp.sin(y)), y

    with axis_rules(mesh):
        (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)(
            params, x, graph)
    gb, pb = nnx.split(_layer())
    (_, y_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(pb, x, gb)
    np.testing.assert_allclose(y, y_ref, atol=F32_ATOL, rtol=0)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_ATOL, rtol=0)
    assert _spec(y)[0] == "data"


def test_training_loop_on_explicit_and_mixed_meshes():
    """The shared loop on ``jax.make_mesh`` meshes of every kind follows the Auto-mesh run (same
    losses; parameters sharded by the rules)."""
    import test_train as tt  # the loop tests' tiny digits task

    cfg = tt._cfg(steps=3, eval_every=3)
    runs = {}
    for kind in ("auto", "explicit", "mixed"):
        mesh = _mesh(kind, names=("data", "tensor"), shape=(4, 2))
        runs[kind] = tt.train(dataclasses.replace(cfg), tt.TASK, mesh=mesh)
    losses = {k: [h["loss"] for h in r.history if h["split"] == "train"] for k, r in runs.items()}
    for kind in ("explicit", "mixed"):
        np.testing.assert_allclose(losses[kind], losses["auto"], rtol=1e-5, err_msg=kind)
        np.testing.assert_allclose(runs[kind].eval_metrics["loss"],
                                   runs["auto"].eval_metrics["loss"], rtol=1e-5, err_msg=kind)
        kern = nnx.state(runs[kind].model, nnx.Param)["attn"]["query_kernel"][...]
        assert kern.sharding.spec[1] == "tensor", kind
