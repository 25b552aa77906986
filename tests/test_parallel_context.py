"""Context-parallel attention (all_gather / ring / ulysses) on 8 simulated CPU devices equals the
unsharded reference in forward and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, F32_GRAD_ATOL, bf16_budget, max_err, rand_inputs

import jaxattn
from jaxattn import masks as M
from jaxattn.parallel import context_parallel_attention, layout, make_mesh

MESHES = {
    "ctx8": dict(context=8),
    "data2_ctx4": dict(data=2, context=4),
    "tensor2_ctx4": dict(tensor=2, context=4),
    "data4_ctx2": dict(data=4, context=2),
}


def _segments(b, t, seed=1):
    """Packed documents: sorted random segment ids [b, t]."""
    r = np.random.default_rng(seed)
    return jnp.asarray(np.sort(r.integers(0, 3, size=(b, t)), axis=1), jnp.int32)


def _kwargs(kind, b, t):
    if kind == "causal":
        return dict(is_causal=True)
    if kind == "window":  # causal sliding window: 6 keys of history (crosses shard borders)
        return dict(mask=M.LocalMask((6, 0)))
    if kind == "segments":
        return dict(query_segment_ids=_segments(b, t))
    if kind == "segments_causal":
        return dict(is_causal=True, query_segment_ids=_segments(b, t))
    if kind == "batch_mask":  # Mask objects holding per-example arrays (batch is sharded too)
        ids = np.asarray(_segments(b, t))
        prefix = np.arange(b, dtype=np.int32) * 3 + 2
        return dict(mask=M.SegmentMask(ids) & M.PrefixLMMask(prefix))
    if kind == "none":
        return {}
    raise ValueError(kind)


def _check(attn, q, k, v, **kw):
    """Forward and gradients of ``attn`` vs the reference, one jit each."""
    ref = functools.partial(jaxattn.dot_product_attention, implementation="reference", **kw)
    got_fn = functools.partial(attn, **kw)
    w = jax.random.normal(jax.random.key(42), q.shape[:3] + v.shape[3:], jnp.float32)

    def value_and_grads(fn):
        def loss(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(out * w), out

        (_, out), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, g

    out, g = jax.jit(lambda q, k, v: value_and_grads(got_fn))(q, k, v)
    out_r, g_r = value_and_grads(ref)
    np.testing.assert_allclose(out, out_r, atol=F32_ATOL, rtol=0)
    for name, a, b in zip("qkv", g, g_r, strict=True):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_ATOL, rtol=0, err_msg=f"d{name}")


CASES = [
    # strategy, mesh, mask, load_balance, T, N, K  (implementation "xla_chunked" unless noted)
    ("ring", "ctx8", "causal", None, 40, 8, 2),  # 5 tokens per device (odd)
    ("ring", "data2_ctx4", "window", None, 32, 4, 2),
    ("ring", "tensor2_ctx4", "segments_causal", None, 32, 4, 1),  # K < tensor size
    ("ring", "data4_ctx2", "none", None, 24, 4, 4),
    ("ring", "ctx8", "causal", "zigzag", 48, 4, 2),
    ("ring", "data2_ctx4", "segments_causal", "striped", 32, 4, 2),
    ("ring", "tensor2_ctx4", "window", "zigzag", 32, 4, 2),
    # 40 % 8**2 != 0: striped falls back to a global permutation; per-hop reference backend
    ("ring", "ctx8", "causal", "striped", 40, 4, 2),
    ("all_gather", "ctx8", "causal", None, 40, 4, 2),
    ("all_gather", "data2_ctx4", "window", None, 32, 4, 1),
    ("all_gather", "tensor2_ctx4", "segments_causal", None, 32, 8, 2),
    ("all_gather", "ctx8", "segments_causal", "zigzag", 48, 4, 2),
    ("all_gather", "data4_ctx2", "segments", None, 24, 4, 2),
    ("ring", "data2_ctx4", "batch_mask", "zigzag", 32, 4, 2),
    ("ulysses", "data2_ctx4", "batch_mask", None, 32, 4, 2),
    ("ulysses", "ctx8", "causal", None, 40, 8, 2),  # K=2 < 8 devices: replicated kv heads
    ("ulysses", "data2_ctx4", "window", None, 32, 4, 1),
    ("ulysses", "tensor2_ctx4", "segments_causal", None, 32, 8, 2),
    ("ulysses", "data4_ctx2", "causal", "zigzag", 24, 4, 2),  # zigzag is a no-op for ulysses
]


@pytest.mark.parametrize("strategy,mesh_name,kind,lb,t,n,k", CASES)
def test_matches_reference(strategy, mesh_name, kind, lb, t, n, k):
    mesh = make_mesh(**MESHES[mesh_name])
    b = 2 if "data4" not in mesh_name else 4
    q, key, v = rand_inputs(seed=t + n, b=b, t=t, s=t, n=n, k=k, h=8)
    impl = "reference" if (lb == "striped" and t % 64) else "xla_chunked"
    attn = functools.partial(context_parallel_attention, mesh=mesh, strategy=strategy,
                             load_balance=lb, implementation=impl)
    _check(attn, q, key, v, **_kwargs(kind, b, t))


@pytest.mark.parametrize("strategy", ["ring", "all_gather", "ulysses"])
def test_per_head_mask_soft_cap_and_lse(strategy):
    """Per-head masks with heads also sharded over tensor; soft-cap; the returned LSE."""
    mesh = make_mesh(tensor=2, context=4)
    q, k, v = rand_inputs(seed=3, b=1, t=32, s=32, n=8, k=2, h=8)
    per_head = M.MultiHeadMask(tuple(M.LocalMask((w, 0)) for w in (1, 3, 5, 9, 2, 4, 31, 0)))
    kw = dict(mask=per_head, logits_soft_cap=2.0)
    attn = functools.partial(context_parallel_attention, mesh=mesh, strategy=strategy,
                             implementation="xla_chunked")
    _check(attn, q, k, v, **kw)
    out, lse = jax.jit(lambda q, k, v: attn(q, k, v, return_lse=True, **kw))(q, k, v)
    _, lse_r = jaxattn.dot_product_attention(q, k, v, return_lse=True,
                                             implementation="reference", **kw)
    np.testing.assert_allclose(lse, lse_r, atol=F32_ATOL, rtol=0)


def test_ring_cross_attention_sinks_and_traced_mask():
    """T != S (bottom-right causal with a traced offset) and attention sinks, through the ring."""
    mesh = make_mesh(data=2, context=4)
    q, k, v = rand_inputs(seed=4, b=2, t=16, s=32, n=4, k=2, h=8)
    sinks = jnp.asarray([0.5, -1.0, 0.0, 2.0], jnp.float32)

    def run(attn, q, k, v, offset):
        return attn(q, k, v, mask=M.CausalMask(offset=offset), sinks=sinks)

    ring = functools.partial(context_parallel_attention, mesh=mesh, strategy="ring",
                             implementation="xla_chunked")
    ref = functools.partial(jaxattn.dot_product_attention, implementation="reference")
    off = jnp.asarray(16, jnp.int32)
    got = jax.jit(run, static_argnums=0)(ring, q, k, v, off)
    want = run(ref, q, k, v, off)
    np.testing.assert_allclose(got, want, atol=F32_ATOL, rtol=0)
    loss = lambda attn: lambda q, k, v: jnp.sum(jnp.sin(run(attn, q, k, v, off)))
    g = jax.jit(jax.grad(loss(ring), argnums=(0, 1, 2)))(q, k, v)
    g_r = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_r, strict=True):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_ATOL, rtol=0)


@pytest.mark.parametrize("strategy", ["all_gather", "ring", "ulysses"])
@pytest.mark.parametrize("bias_shape", [(1, 4, 32, 32), (2, 1, 1, 32)], ids=["full", "keys"])
def test_bias_and_dbias(strategy, bias_shape):
    mesh = make_mesh(data=2, context=4)
    q, k, v = rand_inputs(seed=5, b=2, t=32, s=32, n=4, k=2, h=8)
    bias = jnp.asarray(np.random.default_rng(6).normal(size=bias_shape), jnp.float32)
    balance = None if strategy == "ulysses" else "zigzag"
    attn = functools.partial(context_parallel_attention, mesh=mesh, strategy=strategy,
                             load_balance=balance)
    ref = functools.partial(jaxattn.dot_product_attention, implementation="reference")
    w = jax.random.normal(jax.random.key(3), (2, 32, 4, 8), jnp.float32)

    def value_and_grads(fn):
        loss = lambda *a: jnp.sum(fn(*a, is_causal=True) * w)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)

    (got, g), (want, g_r) = value_and_grads(attn), value_and_grads(ref)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-6)  # a sum over 1024 outputs
    for a, b in zip(g, g_r, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=F32_GRAD_ATOL, rtol=0)


def test_output_is_sequence_sharded():
    mesh = make_mesh(data=2, context=4)
    q, k, v = rand_inputs(seed=7, b=2, t=32, s=32, n=4, k=2, h=8)
    out = jax.jit(functools.partial(context_parallel_attention, mesh=mesh, strategy="ring",
                                    is_causal=True))(q, k, v)
    assert out.sharding.spec[:2] == ("data", "context")
    assert out.addressable_shards[0].data.shape == (1, 8, 4, 8)


# ---- static structure: hop tables and load balance -----------------------------------------


def test_hop_kinds_causal_and_window():
    p, t = 8, 64
    perm = layout.sequence_permutation(t, p, None)
    kinds = layout.hop_kinds(M.CausalMask(), perm, perm, p, None)
    for i in range(p):
        for h in range(p):
            want = M.PARTIAL if h == 0 else (M.FULL if h <= i else M.EMPTY)
            assert kinds[i, h] == want, (i, h)
    window = layout.hop_kinds(M.LocalMask((3, 0)), perm, perm, p, None)
    # a 3-key window never reaches two shards back: only hops 0 and 1 do work
    assert (window[:, 2:] == M.EMPTY).all() and (window[1:, 1] == M.PARTIAL).all()
    assert window[0, 1] == M.EMPTY  # device 0's predecessor holds the sequence end
    # every diagonal block has the same causal pattern: one static mask serves all 8 devices
    codes, static = layout.static_partial_masks(M.CausalMask(), kinds, perm, perm, p, 3)
    assert len(static) == 1 and (codes[:, 0] == 3).all() and (codes[:, 1:] == kinds[:, 1:]).all()
    np.testing.assert_array_equal(static[0].to_array(8, 8), np.tril(np.ones((8, 8), bool)))


def test_ring_skips_communication_the_mask_does_not_need():
    mesh = make_mesh(data=2, context=4)
    q, k, v = rand_inputs(seed=9, b=2, t=32, s=32, n=4, k=2, h=8)
    ring = functools.partial(context_parallel_attention, mesh=mesh, strategy="ring")
    count = lambda **kw: str(jax.make_jaxpr(functools.partial(ring, **kw))(q, k, v)).count(
        "ppermute")
    assert count(mask=M.ChunkedCausalMask(8)) == 0  # chunks == shards: every block is local
    assert count(is_causal=True) > 0


@pytest.mark.parametrize("lb", ["zigzag", "striped"])
def test_local_relayout_matches_permutation(lb):
    """The shard-local reorder (ppermute / all_to_all) equals the global permutation."""
    mesh = make_mesh(data=2, context=4)  # the data axis replicates x
    x = jnp.arange(2 * 32, dtype=jnp.float32).reshape(2, 32)
    perm = layout.sequence_permutation(32, 4, lb)
    from jaxattn.parallel.mesh_axes import shard_map

    spec = jax.sharding.PartitionSpec(None, "context")
    fwd = shard_map(lambda a: layout.to_balanced(a, "context", 4, lb, 1), mesh, (spec,), spec)
    bwd = shard_map(lambda a: layout.from_balanced(a, "context", 4, lb, 1), mesh, (spec,), spec)
    y = jax.jit(fwd)(x)
    np.testing.assert_array_equal(y, np.asarray(x)[:, perm])
    np.testing.assert_array_equal(jax.jit(bwd)(y), x)


@pytest.mark.parametrize("lb", ["zigzag", "striped"])
def test_load_balance_evens_causal_work(lb):
    p, t = 4, 64
    perm = layout.sequence_permutation(t, p, lb)
    assert sorted(perm.tolist()) == list(range(t))
    np.testing.assert_array_equal(perm[layout.inverse_permutation(perm)], np.arange(t))
    pos = perm.reshape(p, t // p)
    work = [(pos[i][:, None] >= np.arange(t)[None, :]).sum() for i in range(p)]
    contiguous = [(np.arange(i * 16, (i + 1) * 16)[:, None] >= np.arange(t)).sum()
                  for i in range(p)]
    assert max(contiguous) / min(contiguous) > 5
    assert max(work) / min(work) < 1.2, work


# ---- errors ----------------------------------------------------------------------------------


def test_errors():
    mesh = make_mesh(data=2, context=4)
    q, k, v = rand_inputs(seed=8, b=2, t=30, s=30, n=4, k=2, h=8)
    with pytest.raises(ValueError, match="not divisible by the size 4"):
        context_parallel_attention(q, k, v, mesh=mesh, strategy="ring")
    q, k, v = rand_inputs(seed=8, b=2, t=12, s=12, n=2, k=2, h=8)
    with pytest.raises(ValueError, match="2 x axis size"):
        context_parallel_attention(q, k, v, mesh=mesh, strategy="ring", load_balance="zigzag")
    with pytest.raises(ValueError, match="ulysses needs the heads per device"):
        context_parallel_attention(q, k, v, mesh=mesh, strategy="ulysses")
    with pytest.raises(ValueError, match="strategy must be one of"):
        context_parallel_attention(q, k, v, mesh=mesh, strategy="tree")
    with pytest.raises(ValueError, match="not a mesh axis"):
        context_parallel_attention(q, k, v, mesh=mesh, axis="sequence")
    with pytest.raises(ValueError, match="load_balance must be one of"):
        context_parallel_attention(q, k, v, mesh=mesh, load_balance="random")


def test_ring_bf16_within_budget():
    mesh = make_mesh(data=2, context=4)
    q, k, v = rand_inputs(seed=10, b=2, t=32, s=32, n=4, k=2, h=8, dtype=jnp.bfloat16)
    out = jax.jit(functools.partial(context_parallel_attention, mesh=mesh, strategy="ring",
                                    is_causal=True, load_balance="zigzag"))(q, k, v)
    assert out.dtype == jnp.bfloat16
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jaxattn.dot_product_attention(*f32, is_causal=True, implementation="reference")
    assert max_err(out, want) <= bf16_budget(q, k, v, mask=M.CausalMask())


@pytest.mark.parametrize("strategy,balance", [("all_gather", None), ("all_gather", "zigzag"),
                                              ("ulysses", None)])
def test_all_gather_and_ulysses_run_the_pallas_kernel(strategy, balance):
    """A static global mask gives each device a static local mask, so Pallas (interpreted on
    CPU) runs inside all_gather (one branch per distinct device pattern) and Ulysses."""
    pytest.importorskip("pallas_kernels")
    mesh = make_mesh(data=2, context=4)
    q, k, v = rand_inputs(seed=12, b=2, t=32, s=32, n=4, k=2, h=8)
    attn = functools.partial(context_parallel_attention, mesh=mesh, strategy=strategy,
                             load_balance=balance, implementation="pallas")
    _check(attn, q, k, v, mask=M.LocalMask((6, 0)), query_segment_ids=_segments(2, 32))


def test_all_gather_static_device_masks():
    """Natural-order causal all_gather: device i's queries [8i, 8i+8) see keys < 8i + 8 only."""
    q_perm = layout.sequence_permutation(32, 4, None)
    kinds, masks = layout.static_device_masks(M.CausalMask(), q_perm, q_perm, 4, 3)
    assert kinds[:, 0].tolist() == [3, 4, 5, 6] and len(masks) == 4
    dense = np.asarray(masks[2].evaluate(np.arange(8), np.arange(32)))[0, 0]
    np.testing.assert_array_equal(dense, np.arange(32)[None, :] <= np.arange(16, 24)[:, None])
    full = layout.static_device_masks(M.FullMask(), q_perm, q_perm, 4, 3)
    assert full[0][:, 0].tolist() == [3, 3, 3, 3] and len(full[1]) == 1  # shared pattern
    assert layout.static_device_masks(None, q_perm, q_perm, 4, 3) is None


def test_ring_runs_the_pallas_kernel_per_device():
    """Static per-block masks let the Pallas kernel (interpreted on CPU) run every ring hop."""
    pytest.importorskip("pallas_kernels")
    mesh = make_mesh(data=2, context=4)
    q, k, v = rand_inputs(seed=11, b=2, t=32, s=32, n=4, k=2, h=8)
    attn = functools.partial(context_parallel_attention, mesh=mesh, strategy="ring",
                             load_balance="zigzag", implementation="pallas")
    _check(attn, q, k, v, is_causal=True, query_segment_ids=_segments(2, 32))
