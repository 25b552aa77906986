"""Combiner (Ren et al., NeurIPS 2021): the fast path equals the implied distribution q(j|i) times
v for every variant; q(j|i) is a full-support distribution where the sparse patterns have holes;
causality, padding, the two mixtures, the plain-attention limit and input errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn
from jaxattn.nn import combiner as C
from jaxattn.nn.mixer import make_mixer

B, N, H, S = 2, 2, 8, 8
CASES = [(v, True) for v in C.VARIANTS] + [(v, False) for v in ("fixed", "logsparse", "axial")]


def _qkv(length, seed=0):
    """Prefixes of one draw of length 64 (so L = 61 is the first 61 positions of L = 64)."""
    ks = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(k, (B, max(length, 64), N, H), jnp.float32)[:, :length]
                 for k in ks)


@functools.cache
def _all(length: int, seed: int = 0):
    """``{(variant, causal, extra): (fast, effective)}`` in one jit (one compile per length);
    ``extra``: the optional pool / summary keys given or not."""
    def f(q, k, v, z):
        out = {}
        for variant, causal in CASES:
            # the optional keys: once each for pooled (fixed) and summary (axial) keys
            with_extra = length == 64 and causal and variant in ("fixed", "axial")
            for extra in (False, True) if with_extra else (False,):
                kw = dict(variant=variant, segment=S, causal=causal)
                if extra:
                    kw["summary_keys" if variant == "axial" else "pool_keys"] = z
                out[(variant, causal, extra)] = (C.combiner_attention(q, k, v, **kw),
                                                 C.effective_attention(q, k, **kw))
        return out
    return jax.tree.map(np.asarray, jax.jit(f)(*_qkv(length, seed)))


@pytest.mark.parametrize("length", [64, 61])  # 61: not divisible by the segment (padding)
def test_fast_path_is_effective_attention_times_v(length):
    v = np.asarray(_qkv(length)[2])
    for key, (fast, eff) in _all(length).items():
        np.testing.assert_allclose(fast, np.einsum("bnij,bjnd->bind", eff, v), atol=2e-5,
                                   rtol=2e-5, err_msg=str(key))


@pytest.mark.parametrize("length", [64, 61])
def test_effective_rows_are_full_support_distributions(length):
    tri = np.tril(np.ones((length, length), bool))
    for (variant, causal, extra), (_, eff) in _all(length).items():
        name = f"{variant} causal={causal} extra={extra}"
        assert eff.shape == (B, N, length, length), name
        assert eff.min() >= 0.0, name
        np.testing.assert_allclose(eff.sum(-1), 1.0, atol=1e-5, err_msg=name)
        support = tri if causal else np.ones_like(tri)
        assert (eff[..., support] > 0).all(), f"{name}: a visible j gets no mass"
        assert (eff[..., ~support] == 0).all(), f"{name}: mass on the future"


def test_sparse_patterns_have_holes():
    length = 64
    tri = np.tril(np.ones((length, length), bool))
    for variant in ("fixed", "logsparse", "axial"):
        pat = C.sparse_pattern(length, variant, S)
        assert not (pat & ~tri).any() and np.diag(pat).all(), variant
        holes = tri & ~pat
        assert holes.sum() > length, f"{variant}: only {holes.sum()} holes"
        # ... which Combiner's q(j|i) fills
        eff = _all(length)[(variant, True, False)][1]
        assert (eff[..., holes] > 0).all(), variant


def test_causal_outputs_ignore_the_future():
    length, t = 64, 29
    q, k, v, z = _qkv(length)
    q2, k2, v2, _ = _qkv(length, seed=1)
    later = (jnp.arange(length) > t)[None, :, None, None]
    mix = lambda a, b: jnp.where(later, b, a)

    @jax.jit
    def outs(q, k, v):
        return [C.combiner_attention(q, k, v, variant=var, segment=S) for var in C.VARIANTS]

    for var, y, y2 in zip(C.VARIANTS, outs(q, k, v), outs(mix(q, q2), mix(k, k2), mix(v, v2)),
                          strict=True):
        np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], atol=1e-6, err_msg=var)
        assert not np.allclose(y[:, t + 1:], y2[:, t + 1:]), f"{var}: the check cannot fail"


def test_padding_matches_the_unpadded_prefix():
    """Causal: the outputs at L = 61 (padded to 64 inside) equal the first 61 outputs at
    L = 64 (the same draw)."""
    long, short = _all(64), _all(61)
    for variant, causal in CASES:
        if causal:
            got, want = short[(variant, True, False)][0], long[(variant, True, False)][0]
            assert got.shape == (B, 61, N, H)
            np.testing.assert_allclose(got, want[:, :61], atol=1e-6, err_msg=variant)


def test_mixture_avg_differs_from_mixture_joint():
    joint = _all(64)[("mixture", True, False)][1]
    avg = _all(64)[("mixture_avg", True, False)][1]
    assert np.abs(joint - avg).max() > 1e-3
    # the first row of the grid has no region (only its direct set): both plans agree there
    np.testing.assert_allclose(joint[..., :S, :], avg[..., :S, :], atol=1e-6)


def test_one_segment_is_plain_attention():
    """Segment = L: no regions, the direct set is everything visible: exact attention."""
    q, k, v, _ = _qkv(32)

    @jax.jit
    def both(q, k, v):
        return [(jaxattn.dot_product_attention(q, k, v, is_causal=causal),
                 [C.combiner_attention(q, k, v, variant=var, segment=32, causal=causal)
                  for var in ("fixed", "axial")]) for causal in (True, False)]

    for want, gots in both(q, k, v):
        for got in gots:
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_inputs_name_the_argument():
    q, k, v, _ = _qkv(16)
    with pytest.raises(ValueError, match="variant must be one of"):
        C.combiner_attention(q, k, v, variant="strided")
    with pytest.raises(ValueError, match=r"q must be \[B, L, N, H\], got shape \(2, 16, 16\)"):
        C.combiner_attention(q.reshape(B, 16, N * H), k, v)
    with pytest.raises(ValueError, match=r"q and k must have the same shape.*k \(2, 15, 2, 8\)"):
        C.combiner_attention(q, k[:, :15], v)
    with pytest.raises(ValueError, match=r"v must be .*got v \(2, 16, 1, 8\)"):
        C.combiner_attention(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match="segment must be a positive int, got 0"):
        C.combiner_attention(q, k, v, segment=0)
    with pytest.raises(ValueError, match=r"summary_keys must have k's shape"):
        C.effective_attention(q, k, variant="axial", summary_keys=k[:, :8])
    with pytest.raises(ValueError, match="causal only"):
        C.combiner_attention(q, k, v, variant="mixture", causal=False)
    with pytest.raises(ValueError, match="does not support the 'self' pattern"):
        make_mixer("combiner_mixture", features=16, num_heads=2, causal=False,
                   rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="causal only"):
        C.CombinerAttention(16, num_heads=2, variant="mixture_avg", causal=False,
                            rngs=nnx.Rngs(0))


def test_mixer_options_build_and_run():
    """DeepSets region keys and the paper's mixture option (the conformance suite builds every
    mixer with its defaults; mixture_avg itself is tested above at the function level)."""
    x = jax.random.normal(jax.random.key(3), (1, 12, 8))
    m = make_mixer("combiner_fixed", features=8, num_heads=2, causal=True, rngs=nnx.Rngs(0),
                   pool="deepsets")
    y = m(x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    assert make_mixer("combiner_mixture", features=8, num_heads=2, causal=True,
                      rngs=nnx.Rngs(0), mixture="avg").variant == "mixture_avg"
    with pytest.raises(ValueError, match="pool must be"):
        make_mixer("combiner_fixed", features=8, num_heads=2, causal=True, rngs=nnx.Rngs(0),
                   pool="mean")
