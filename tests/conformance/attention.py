"""Attention-backend conformance suite: one list of cases for every attention backend.

:class:`AttentionConformance` holds the cases; a backend's test file subclasses it in a few lines::

    class TestXlaChunked(AttentionConformance):
        implementation = "xla_chunked"
        block_q = block_kv = 16

Every case calls the public API (``jaxattn.dot_product_attention(..., implementation=...)``) and
compares forward, LSE and gradients with the *specification*: ``jaxattn.core.dense``'s reference
run on a dense boolean mask that this module builds itself from the mask rule, ``is_causal`` and
the segment ids (so the reference backend, too, is tested against something other than itself).

What a backend cannot do is declared in ``unsupported`` (feature names, see :data:`FEATURES`);
cases needing such a feature are skipped with the reason. ``platform = "gpu"`` skips the whole
class on other platforms.

Compilations: the backend and the specification each run through ONE module-level jitted
function (forward, LSE and random-projection gradients in one program) whose static arguments
are the implementation, the mask rule and the options. Cases that share shapes and statics share
programs, the specification is compiled once per shape family (its mask is traced data), and the
random mask compositions are traced data of a few fixed padded shapes for backends that take
traced masks.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import (
    F32_ATOL,
    F32_GRAD_ATOL,
    bf16_budget,
    jit_for_tests,
    max_err,
    rand_inputs,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_masks import MASKS  # the same random-composition strategy as the mask tests

import jaxattn
from jaxattn import masks as M
from jaxattn.core import dense, merge_partials
from jaxattn.core import dropout as dropout_lib

__all__ = ["AttentionConformance", "FEATURES", "Opts", "seg_ids", "dense_allowed",
           "assert_lse_close"]

B, T, S, N, K, H = 2, 37, 53, 4, 2, 16  # odd lengths, T != S, GQA

# Features a backend may declare in ``unsupported``.
FEATURES = frozenset({
    "float32", "bias", "lse", "soft_cap", "sinks", "segments", "dropout", "traced_mask",
    "general_masks",  # anything beyond is_causal / CausalMask() / LocalMask((w, 0))
})


def seg_ids(length, bounds, b=B):
    """int32 ``[b, length]``: document ids that change at ``bounds`` (shifted by 1 per row)."""
    rows = [np.searchsorted(np.asarray(bounds) + i, np.arange(length), side="right")
            for i in range(b)]
    return jnp.asarray(np.stack(rows), jnp.int32)


def dense_allowed(mask, t, s, *, is_causal=False, seg_q=None, seg_kv=None):
    """bool ``[B|1, N|1, t, s]`` (NumPy): what a call may attend, built without the dispatcher."""
    allowed = np.ones((1, 1, t, s), bool)
    if mask is not None:
        a = np.asarray(M.as_mask(mask).to_array(t, s))
        allowed = allowed & a.reshape((1,) * (4 - a.ndim) + a.shape)
    if is_causal:
        allowed = allowed & np.tril(np.ones((t, s), bool))
    if seg_q is not None:
        seg_kv = seg_q if seg_kv is None else seg_kv
        same = np.asarray(seg_q)[:, None, :, None] == np.asarray(seg_kv)[:, None, None, :]
        allowed = allowed & same
    return allowed


def assert_lse_close(lse, expect, atol):
    """Same -inf pattern (rows that see no key) and the finite entries within ``atol``."""
    lse, expect = np.asarray(lse), np.asarray(expect)
    finite = np.isfinite(expect)
    assert np.array_equal(finite, np.isfinite(lse)), "rows with lse = -inf differ"
    assert max_err(np.where(finite, lse, 0.0), np.where(finite, expect, 0.0)) < atol


@dataclasses.dataclass(frozen=True)
class Opts:
    """Static (hashable) options of one call."""

    scale: float | None = None
    is_causal: bool = False
    logits_soft_cap: float | None = None
    dropout_rate: float = 0.0
    with_lse: bool = True

    @property
    def for_spec(self) -> Opts:
        """What the specification needs (causality is already in its dense mask)."""
        return Opts(self.scale, False, self.logits_soft_cap, self.dropout_rate, True)


# ---- the two jitted programs every case runs (module level: jit caches them across cases) ----
# Compiled with attention_testing.CPU_COMPILE_OPTIONS on CPU (compile time is the suite's cost).


def _with_grads(attn, diff, w_out, w_lse):
    """``(out, lse, grads)``: gradients of ``<out, w_out> + <finite lse, w_lse>`` w.r.t. the
    pytree ``diff`` (None leaves get None). A random projection gives every output entry a
    non-zero cotangent (``sum(out**2)`` would not, e.g. on a zero row)."""

    def loss(diff):
        out, lse = attn(*diff)
        total = jnp.sum(out.astype(jnp.float32) * w_out)
        if lse is not None and w_lse is not None:
            total = total + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse)
        return total, (out, lse)

    g, (out, lse) = jax.grad(loss, has_aux=True)(diff)
    return out, lse, g


@jit_for_tests(static_argnames=("impl", "mask", "opts", "grads"))
def backend_run(q, k, v, bias, sinks, seg_q, seg_kv, rng, mask_array, w_out, w_lse, *, impl,
                mask, opts, grads):
    """The backend through ``jaxattn.dot_product_attention``: ``(out, lse|None, grads|None)``
    with grads for ``(q, k, v, bias, sinks)``. ``mask`` is a static rule; ``mask_array`` (bool,
    traced) is used instead when given."""

    def attn(q, k, v, bias, sinks):
        res = jaxattn.dot_product_attention(
            q, k, v, bias, mask if mask_array is None else mask_array, scale=opts.scale,
            is_causal=opts.is_causal, query_segment_ids=seg_q, kv_segment_ids=seg_kv,
            logits_soft_cap=opts.logits_soft_cap, sinks=sinks, dropout_rate=opts.dropout_rate,
            dropout_rng=rng, return_lse=opts.with_lse, implementation=impl)
        return res if opts.with_lse else (res, None)

    if not grads:
        return (*attn(q, k, v, bias, sinks), None)
    return _with_grads(attn, (q, k, v, bias, sinks), w_out, w_lse)


@jit_for_tests(static_argnames=("opts", "grads"))
def spec_run(q, k, v, bias, sinks, allowed, rng, w_out, w_lse, *, opts, grads):
    """The specification (dense reference on the traced mask ``allowed``), same outputs as
    :func:`backend_run`."""

    def attn(q, k, v, bias, sinks):
        return dense.attention_reference(
            q, k, v, bias, allowed, scale=opts.scale, logits_soft_cap=opts.logits_soft_cap,
            sinks=sinks, dropout_rate=opts.dropout_rate, dropout_rng=rng, return_lse=True)

    if not grads:
        return (*attn(q, k, v, bias, sinks), None)
    return _with_grads(attn, (q, k, v, bias, sinks), w_out, w_lse)


def _projections(q, v):
    """Fixed random cotangents for ``out [B, T, N, Hv]`` and ``lse [B, T, N]`` (NumPy)."""
    b, t, n, _ = q.shape
    r = np.random.default_rng(42)
    w_out = r.standard_normal((b, t, n, v.shape[-1])).astype(np.float32)
    w_lse = r.standard_normal((b, t, n)).astype(np.float32)
    return w_out, w_lse


# Library functions the cases call outside the backend, jitted once (eagerly, every op would
# compile on its own for every new shape).
_jax_nn_attention = jit_for_tests(jax.nn.dot_product_attention,
                                  static_argnames=("is_causal", "local_window_size"))
_keep_mask = jit_for_tests(dropout_lib.keep_mask, static_argnums=(5, 6))
_merge_partials = jit_for_tests(merge_partials)


def _all(x) -> bool:
    return bool(np.all(np.asarray(x)))


GRAD_NAMES = ("dq", "dk", "dv", "dbias", "dsinks")


# ---- fixed cases ------------------------------------------------------------------------------

SEG_Q, SEG_KV = seg_ids(T, [9, 25]), seg_ids(S, [12, 30])

# name -> (mask rule, extra keyword arguments, features needed). T=37, S=53, B=2, N=4, K=2.
MASK_KINDS = {
    "none": (None, {}, ()),
    "causal": (None, dict(is_causal=True), ()),
    "causal_offset": (M.CausalMask(offset=S - T), {}, ("general_masks",)),
    "local": (M.LocalMask((7, 3)), {}, ("general_masks",)),
    "local_offset": (M.LocalMask((9, 3), offset=S - T), {}, ("general_masks",)),
    "local_causal": (M.LocalMask((6, 0)), {}, ()),
    "chunked_8": (M.ChunkedCausalMask(8), {}, ("general_masks",)),
    "chunked_12": (M.ChunkedCausalMask(12), {}, ("general_masks",)),
    "prefix": (M.PrefixLMMask(10), {}, ("general_masks",)),
    "prefix_per_example": (M.PrefixLMMask(np.array([5, 20])), {}, ("general_masks",)),
    "per_head": (M.MultiHeadMask((M.CausalMask(), M.LocalMask((4, 0)), M.FullMask(),
                                  M.ChunkedCausalMask(5))), {}, ("general_masks",)),
    "array": (M.ArrayMask(np.random.default_rng(4).random((T, S)) > 0.5), {},
              ("general_masks",)),
    "array_per_example": (M.ArrayMask(np.random.default_rng(3).random((B, 1, T, S)) > 0.6), {},
                          ("general_masks",)),
    "composed": ((M.LocalMask((3, 3)) | M.PrefixLMMask(6)) & ~M.ChunkedCausalMask(16), {},
                 ("general_masks",)),
    "and_or": ((M.CausalMask() & M.LocalMask((10, 0))) | M.PrefixLMMask(6), {},
               ("general_masks",)),
    "lengths": (M.LengthMask(kv_lengths=np.array([20, 53])), {}, ("general_masks",)),
    "segments_causal": (None, dict(is_causal=True, seg_q=SEG_Q, seg_kv=SEG_KV), ("segments",)),
    "segments_local": (M.LocalMask((6, 0)), dict(seg_q=SEG_Q, seg_kv=SEG_KV), ("segments",)),
}

BIAS_SHAPES = {"full": (2, 4, T, S), "heads_cols": (1, 4, 1, S), "batch_rows": (2, 1, T, 1),
               "rank2": (T, S)}

# bf16 cases: name -> (mask rule, is_causal, features needed).
BF16_MASKS = {
    "causal": (None, True, ()),
    "window": (M.LocalMask((20, 0)), False, ()),
    "offset_window": (M.CausalMask(offset=S - T) & M.LocalMask((20, 0)), False,
                      ("general_masks",)),
    "offset_both": (M.CausalMask(offset=S - T) & M.LocalMask((20, 0), offset=S - T), False,
                    ("general_masks",)),
}

JAX_NN_CASES = ["plain", "causal", "bias", "mask", "window"]
HEAD_LAYOUTS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


class AttentionConformance:
    """The shared cases. Subclasses (named ``Test...``) set ``implementation`` and options.

    Not collected itself (no ``Test`` prefix); every subclass runs every case.
    """

    implementation: str = "reference"
    block_q: int | None = None  # tile sizes (tiled backends): jaxattn.Implementation(...)
    block_kv: int | None = None
    platform: str | None = None  # e.g. "gpu": skip the class unless jax runs there
    unsupported: frozenset = frozenset()  # names from FEATURES
    # Random mask compositions: examples, and the padded (Tp, Sp) array shapes they are drawn
    # in (traced masks: one program per shape; real lengths t <= Tp, s <= Sp are embedded by
    # masking). Backends without traced masks compile per example at the exact lengths.
    random_examples: int = 100
    random_shapes: tuple = ((1, 40), (40, 1), (37, 45))
    random_derandomize: bool = False

    # ---- plumbing ------------------------------------------------------------------------

    def setup_method(self):
        if self.platform is not None and jax.default_backend() != self.platform:
            pytest.skip(f"{self.implementation} runs on {self.platform}, this run is on "
                        f"{jax.default_backend()}")
        unknown = set(self.unsupported) - FEATURES
        assert not unknown, f"unknown features in unsupported: {sorted(unknown)}"

    @property
    def impl(self):
        if self.block_q is None and self.block_kv is None:
            return self.implementation
        return jaxattn.Implementation(self.implementation, self.block_q, self.block_kv)

    def require(self, *features):
        missing = sorted(set(features) & set(self.unsupported))
        if missing:
            pytest.skip(f"{self.implementation} does not support {', '.join(missing)}")

    def require_inputs(self, dtype=jnp.float32, bias=None):
        self.require(*(["float32"] if dtype == jnp.float32 else []),
                     *(["bias"] if bias is not None else []))

    def run(self, q, k, v, *, mask=None, bias=None, sinks=None, seg_q=None, seg_kv=None,
            rng=None, mask_array=None, opts=Opts(), grads=True):
        """The backend: ``(out, lse|None, grads|None)``."""
        if "lse" in self.unsupported:
            opts = dataclasses.replace(opts, with_lse=False)
        w_out, w_lse = _projections(q, v)
        return backend_run(q, k, v, bias, sinks, seg_q, seg_kv, rng, mask_array, w_out,
                           w_lse if opts.with_lse else None, impl=self.impl, mask=mask,
                           opts=opts, grads=grads)

    @staticmethod
    def spec(q, k, v, allowed, *, bias=None, sinks=None, rng=None, opts=Opts(), grads=True,
             with_lse=True):
        """The specification on the dense mask ``allowed``: ``(out, lse, grads|None)``."""
        w_out, w_lse = _projections(q, v)
        return spec_run(q, k, v, bias, sinks, np.asarray(allowed), rng, w_out,
                        w_lse if with_lse else None, opts=opts.for_spec, grads=grads)

    def check_against_spec(self, q, k, v, *, mask=None, bias=None, sinks=None, seg_q=None,
                           seg_kv=None, rng=None, mask_array=None, opts=Opts(), grads=True,
                           atol=F32_ATOL, grad_atol=F32_GRAD_ATOL):
        """Forward, LSE (its -inf pattern too) and gradients of the backend equal the spec's."""
        self.require_inputs(q.dtype, bias)
        if sinks is not None:
            self.require("sinks")
        if opts.logits_soft_cap is not None:
            self.require("soft_cap")
        if seg_q is not None:
            self.require("segments")
        if opts.dropout_rate > 0:
            self.require("dropout")
        t, s = q.shape[1], k.shape[1]
        if mask_array is None:
            allowed = dense_allowed(mask, t, s, is_causal=opts.is_causal, seg_q=seg_q,
                                    seg_kv=seg_kv)
        else:
            assert not opts.is_causal and seg_q is None
            allowed = mask_array
        out, lse, g = self.run(q, k, v, mask=mask, bias=bias, sinks=sinks, seg_q=seg_q,
                               seg_kv=seg_kv, rng=rng, mask_array=mask_array, opts=opts,
                               grads=grads)
        r_out, r_lse, r_g = self.spec(q, k, v, allowed, bias=bias, sinks=sinks, rng=rng,
                                      opts=opts, grads=grads, with_lse=lse is not None)
        assert out.shape == r_out.shape and out.dtype == q.dtype
        assert max_err(out, r_out) < atol
        if lse is not None:
            assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
            assert_lse_close(lse, r_lse, atol)
        if grads:
            for name, a, r in zip(GRAD_NAMES, g, r_g, strict=True):
                if r is None:
                    continue
                assert a.shape == r.shape and a.dtype == r.dtype, name
                assert max_err(a, r) < grad_atol, name
        return out, lse, g

    # ---- masks ---------------------------------------------------------------------------

    @pytest.mark.parametrize("name", list(MASK_KINDS))
    def test_mask_kinds(self, name):
        """Every mask kind, T=37 != S=53, GQA: forward, LSE and gradients."""
        mask, kw, needs = MASK_KINDS[name]
        self.require(*needs)
        q, k, v = rand_inputs(5, t=T, s=S, n=N, k=K, h=H)
        kw = dict(kw)
        opts = Opts(is_causal=kw.pop("is_causal", False))
        self.check_against_spec(q, k, v, mask=mask, opts=opts, **kw)

    @pytest.mark.parametrize("layout", ["mha", "mqa"])
    def test_head_layouts_grads(self, layout):
        """MHA and MQA (GQA is every other case's default) with gradients, causal."""
        n, kh = HEAD_LAYOUTS[layout]
        q, k, v = rand_inputs(1, t=T, s=S, n=n, k=kh)
        self.check_against_spec(q, k, v, opts=Opts(is_causal=True))

    def test_random_mask_compositions(self):
        """Random ``&`` / ``|`` / ``~`` compositions of every rule (hypothesis).

        Backends taking traced masks: the dense mask is data of one of a few padded shapes, so
        all examples share a handful of compiled programs; the real lengths ``t <= Tp``,
        ``s <= Sp`` are embedded (rows past ``t`` and keys past ``s`` masked). Others (Pallas:
        block metadata is static) compile per example at the exact lengths ``random_shapes``.
        """
        self.require("general_masks", "float32")
        traced = "traced_mask" not in self.unsupported
        if traced:
            shapes = st.sampled_from(self.random_shapes).flatmap(
                lambda p: st.tuples(st.just(p), st.integers(1, p[0]), st.integers(1, p[1])))
        else:
            shapes = st.sampled_from(self.random_shapes).map(lambda p: (p, *p))

        @settings(max_examples=self.random_examples, deadline=None,
                  derandomize=self.random_derandomize)
        @given(mask=MASKS, shape=shapes)
        def check(mask, shape):
            (tp, sp), t, s = shape
            q, k, v = rand_inputs(18, b=1, t=tp, s=sp, n=2, k=1, h=8)
            if traced:
                allowed = np.zeros((1, 1, tp, sp), bool)
                allowed[..., :t, :s] = dense_allowed(mask, t, s)
                self.check_against_spec(q, k, v, mask_array=allowed)
            else:
                self.check_against_spec(q, k, v, mask=mask)

        check()

    @pytest.mark.parametrize("variant", ["with_mask", "with_bias"])
    def test_fully_masked_rows_are_zero_with_zero_grads(self, variant):
        """Rows that see no key: output 0, LSE -inf, finite gradients, exactly zero dq, and all
        gradients equal to the spec's under a random-projection cotangent.

        Catches plant (ii): jaxattn/core/chunked.py, ``_backward.tile_grads`` (line 311 at
        8e5f8dc), the line ``s = jnp.where(tiles.allowed(qi, kj), s, -jnp.inf)`` changed to
        ``s = jnp.where(tiles.allowed(qi, kj) | ~jnp.isfinite(_rows(lse, qi, r))[..., None],
        s, -jnp.inf)`` (the backward ignores the mask on rows whose LSE is -inf). A
        ``sum(out**2)`` loss has cotangent 0 on a zero row, so only the projection sees it.
        """
        self.require("general_masks")
        if variant == "with_mask":  # ArrayMask: rows 3 and 20.. see nothing
            q, k, v = rand_inputs(6, b=1, t=T, s=S, n=2, k=2)
            allowed = np.ones((T, S), bool)
            allowed[3] = False
            allowed[20:] = False
            mask, bias, empty = M.ArrayMask(allowed), None, [3, *range(20, T)]
        else:  # dense bool mask argument and a zero bias, T = S = 8
            q, k, v = rand_inputs(12, t=8, s=8)
            allowed = np.tril(np.ones((8, 8), bool))
            allowed[3] = False
            mask, bias, empty = allowed, np.zeros((1, 1, 8, 8), np.float32), [3]
        out, lse, g = self.check_against_spec(q, k, v, mask=M.as_mask(mask), bias=bias)
        out, g = np.asarray(out), [None if x is None else np.asarray(x) for x in g]
        assert _all(out[:, empty] == 0) and _all(np.isfinite(out))
        if lse is not None:
            assert _all(np.isneginf(np.asarray(lse)[:, empty]))
        assert _all(g[0][:, empty] == 0)  # dq of an empty row is exactly zero
        for x in g:
            assert x is None or _all(np.isfinite(x))
        # The sum(out**2) loss of the old tests: finite, and dq 0 on the empty rows.
        f = lambda q, k, v, b: jaxattn.dot_product_attention(q, k, v, b, mask=mask,
                                                             implementation=self.impl)
        sum_sq_grads = jit_for_tests(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))
        g2 = sum_sq_grads(q, k, v, bias)
        assert all(_all(np.isfinite(x)) for x in g2)
        assert _all(np.asarray(g2[0])[:, empty] == 0)

    # ---- bias ------------------------------------------------------------------------------

    @pytest.mark.parametrize("shape", list(BIAS_SHAPES))
    def test_bias_and_dbias(self, shape):
        """Additive bias with broadcast dims (and rank 2); dbias has the bias's shape."""
        q, k, v = rand_inputs(7, t=T, s=S)
        bias = np.random.default_rng(8).normal(size=BIAS_SHAPES[shape]).astype(np.float32)
        self.require("general_masks")
        _, _, g = self.check_against_spec(q, k, v, bias=bias, mask=M.CausalMask(offset=10))
        assert g[3].shape == bias.shape

    def test_additive_neg_inf_bias_rows(self):
        """A row masked only by a -inf bias (tiles the mask metadata calls full): zeros, finite
        gradients equal to the spec's."""
        q, k, v = rand_inputs(19, t=8, s=8)
        bias = np.zeros((1, 1, 8, 8), np.float32)
        bias[:, :, 3, :] = -np.inf
        out, _, g = self.check_against_spec(q, k, v, bias=bias)
        assert _all(np.asarray(out)[:, 3] == 0) and _all(np.isfinite(out))
        for x in g:
            assert x is None or _all(np.isfinite(x))

    # ---- features --------------------------------------------------------------------------

    @pytest.mark.parametrize("case", ["gqa_local_scale_value_dim", "mqa_causal_offset"])
    def test_soft_cap_and_sinks(self, case):
        """Soft-cap (with large logits, so it matters) and sinks, with their gradients."""
        if case == "gqa_local_scale_value_dim":
            q, k, v = rand_inputs(9, t=T, s=S, n=6, k=2, h=8, hv=12)
            sinks = np.asarray([0.5, -1.0, 2.0, 0.0, 1.0, -3.0], np.float32)
            mask, opts = M.LocalMask((6, 0)), Opts(scale=0.3, logits_soft_cap=5.0)
        else:
            q, k, v = rand_inputs(4, t=T, s=S, n=4, k=1, h=16, hv=8)
            sinks = np.asarray([0.5, -1.0, 0.0, 2.0], np.float32)
            mask, opts = M.CausalMask(offset=S - T), Opts(logits_soft_cap=4.0)
            self.require("general_masks")
        out, _, _ = self.check_against_spec(q * 3.0, k, v, mask=mask, sinks=sinks, opts=opts)
        assert out.shape == q.shape[:3] + (v.shape[-1],)

    @pytest.mark.parametrize("case", ["causal", "local_sinks"])
    def test_self_attention_segment_ids(self, case):
        """T == S with only query segment ids (kv ids default to them), traced under jit."""
        q, k, v = rand_inputs(6, t=S, s=S)
        if case == "causal":
            ids = np.sort(np.random.default_rng(3).integers(0, 4, (B, S)), axis=1)
            self.check_against_spec(q, k, v, seg_q=ids, opts=Opts(is_causal=True))
        else:
            ids = seg_ids(S, [7, 19, 33])
            sinks = np.asarray([0.1, 0.2, -0.3, 1.0], np.float32)
            self.check_against_spec(q, k, v, mask=M.LocalMask((6, 0)), seg_q=ids, sinks=sinks)

    @pytest.mark.parametrize("case", list(BF16_MASKS))
    def test_bf16_within_budget(self, case):
        """bf16 forward within twice the error of a bf16 reference; gradients within 8 bf16
        ulps (2^-8) of their scale. ``causal`` and ``window`` are what cuDNN runs."""
        mask, is_causal, needs = BF16_MASKS[case]
        self.require(*needs)
        q, k, v = rand_inputs(11, t=T, s=S, dtype=jnp.bfloat16)
        self._check_bf16(q, k, v, mask=mask, opts=Opts(is_causal=is_causal))

    def test_bf16_soft_cap_within_budget(self):
        """bf16 with soft-cap and an explicit scale: low precision keeps the scale on the logits
        in xla_chunked (f32 folds it into q), a path no f32 case reaches.

        Catches plant (i): jaxattn/core/chunked.py, ``_Tiles.logits`` (lines 206-211 at
        8e5f8dc), the soft-cap taken before the scale: ``x = x + bt`` and
        ``s = sm.soft_cap(x, self.st.soft_cap)`` first, then ``x, s = x * scale, s * scale``
        (instead of scale, bias, then cap). f32 folds the scale into q (``st.scale == 1``), so
        only bf16/f16 with a soft-cap reaches it; it fails only this case.
        """
        q, k, v = rand_inputs(9, t=T, s=S, dtype=jnp.bfloat16)
        self.require("soft_cap")
        self._check_bf16(q * jnp.bfloat16(3.0), k, v, mask=M.LocalMask((20, 0)),
                         opts=Opts(scale=0.3, logits_soft_cap=5.0))

    def _check_bf16(self, q, k, v, *, mask, opts=Opts()):
        """bf16 forward against the f32 spec within :func:`bf16_budget`; gradients of the
        output projection (no LSE term) within 8 bf16 ulps (2^-8) of their scale."""
        opts = dataclasses.replace(opts, with_lse=False)
        out, _, g = self.run(q, k, v, mask=mask, opts=opts)
        f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
        allowed = dense_allowed(mask, q.shape[1], k.shape[1], is_causal=opts.is_causal)
        r_out, _, r_g = self.spec(*f32, allowed, opts=opts, with_lse=False)
        assert out.dtype == jnp.bfloat16
        budget = bf16_budget(q, k, v, mask=allowed, scale=opts.scale,
                             logits_soft_cap=opts.logits_soft_cap)
        assert max_err(out, r_out) <= budget
        for name, a, r in zip(GRAD_NAMES[:3], g[:3], r_g[:3], strict=True):
            assert a.dtype == jnp.bfloat16, name
            assert max_err(a, r) <= 8 * 2.0**-8 * float(np.max(np.abs(r))), name

    # ---- dropout ---------------------------------------------------------------------------

    @pytest.mark.parametrize("case", ["causal", "causal_segments"])
    def test_dropout_matches_spec(self, case):
        """Same rng, same dropped entries as the reference (position hash): forward, LSE and
        gradients match, and dropout changes the output."""
        q, k, v = rand_inputs(21, t=T, s=S, n=4, k=2)
        if case == "causal":
            rate, rng, seg = 0.3, jax.random.key(7), {}
        else:
            rate, rng = 0.25, jax.random.key(9)
            seg = dict(seg_q=seg_ids(T, [20]), seg_kv=seg_ids(S, [20]))
        opts = Opts(is_causal=True, dropout_rate=rate)
        out, _, _ = self.check_against_spec(q, k, v, rng=rng, opts=opts, **seg)
        plain, _, _ = self.run(q, k, v, opts=Opts(is_causal=True), grads=False, **seg)
        assert max_err(out, plain) > 0.1

    def test_dropout_is_deterministic_and_unbiased(self):
        """Same rng -> same output, other rng -> other output; unbiased: over 200 samples every
        entry's mean is within 5 standard errors of the no-dropout output (a z-test per entry).
        The 200 samples are 200 batch copies of the inputs in ONE call (the hash gives every
        batch row its own mask), not 200 calls."""
        self.require("dropout", "float32")
        q, k, v = rand_inputs(14, t=16, s=16)
        copies = 200
        big = [np.tile(np.asarray(x), (copies, 1, 1, 1)) for x in (q, k, v)]
        opts = Opts(dropout_rate=0.5)
        run = lambda key: np.asarray(self.run(*big, rng=jax.random.key(key), opts=opts,
                                              grads=False)[0])
        a, b, c = run(0), run(0), run(1)
        assert max_err(a, b) == 0.0 and max_err(a, c) > 1e-3
        samples = a.reshape(copies, *q.shape[:3], v.shape[-1])
        plain = np.asarray(self.run(q, k, v, grads=False)[0])
        z = (samples.mean(0) - plain) / (samples.std(0) / np.sqrt(copies))
        assert np.abs(z).max() < 5 and abs(z.mean()) < 0.2

    def test_dropout_masks_differ_for_every_batch_and_head(self):
        """The keep mask read back through the backend (q = 0: uniform probabilities; one-hot
        values: ``out[b, i, n, j] = keep[b, n, i, j] / (S (1 - rate))``) is the position hash,
        keeps 1 - rate of the entries, and differs between EVERY two (batch, head) rows.

        Catches plant (iii): jaxattn/core/dropout.py ``keep_mask`` (line 54 at 8e5f8dc), the row
        index ``row = u32(batch_idx) * jnp.uint32(num_heads) + u32(head_idx)`` written with
        stride ``num_heads - 1`` (and the same in the kernels' bit-equal copy,
        pallas_kernels/flash/dropout.py line 34, else the Pallas-vs-reference cases see it):
        then (b, N-1) and (b+1, 0) share a mask, which a test comparing only head 0 with head 1
        and batch 0 with batch 1 never sees. All backends fail this case.
        """
        self.require("dropout", "float32")
        b, n, kh, length, rate = 3, 4, 2, 32, 0.5
        q = np.zeros((b, length, n, 16), np.float32)
        k = np.random.default_rng(0).normal(size=(b, length, kh, 16)).astype(np.float32)
        v = np.ascontiguousarray(np.broadcast_to(
            np.eye(length, dtype=np.float32)[None, :, None, :], (b, length, kh, length)))
        rng = jax.random.key(3)
        out = np.asarray(self.run(q, k, v, rng=rng, opts=Opts(dropout_rate=rate),
                                  grads=False)[0])
        kept = out * (length * (1 - rate))  # 1 where kept, 0 where dropped
        np.testing.assert_allclose(kept[(kept != 0)], 1.0, rtol=1e-5)
        keep = np.transpose(kept != 0, (0, 2, 1, 3))  # [B, N, T, S]
        idx = [np.arange(d).reshape([-1 if i == j else 1 for j in range(4)])
               for i, d in enumerate(keep.shape)]
        expect = _keep_mask(dropout_lib.dropout_seed(rng), *idx, rate, n)
        np.testing.assert_array_equal(keep, np.asarray(expect))
        assert abs(keep.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / keep.size)
        rows = keep.reshape(b * n, -1)
        for i, j in itertools.combinations(range(b * n), 2):
            assert (rows[i] != rows[j]).mean() > 0.3, f"(batch, head) rows {i} and {j} collide"

    # ---- LSE, merging, jit, shapes ----------------------------------------------------------

    def test_lse_is_logsumexp_of_logits(self):
        self.require("lse", "float32")
        q, k, v = rand_inputs(10, t=T, s=S)
        _, lse, _ = self.run(q, k, v, opts=Opts(is_causal=True), grads=False)
        q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
        logits = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, 2, axis=2)) * 16**-0.5
        logits = np.where(np.tril(np.ones((T, S), bool)), logits, -np.inf)
        top = logits.max(-1, keepdims=True)
        expect = np.transpose((top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0],
                              (0, 2, 1))
        assert max_err(lse, expect) < F32_ATOL

    def test_partials_merge_to_the_whole(self):
        """Attention over disjoint key blocks (with their LSEs) merges with ``merge_partials``
        into attention over all keys: out AND lse. The parts include rows that see no key of
        the part, a part that sees no key at all, and a row that sees no key in any part.

        Catches plant (iv): jaxattn/core/softmax.py ``merge_partials`` (line 56 at 8e5f8dc),
        ``lse = m + safe_log(total)`` changed to ``lse = safe_log(total)`` (the merged output
        stays right, so only an LSE assertion sees it); also ``jnp.max`` for ``safe_max`` on
        line 53 (NaN on the row that is empty in every part).
        """
        self.require("lse", "float32", "general_masks")
        q, k, v = rand_inputs(13, t=T, s=S)
        allowed = np.tril(np.ones((T, S), bool))
        allowed[3] = False
        parts = [(slice(0, 20), allowed[:, :20]), (slice(20, S), allowed[:, 20:]),
                 (slice(20, S), np.zeros((T, S - 20), bool))]  # the last part sees nothing
        outs, lses = [], []
        for keys, part_mask in parts:
            out, lse, _ = self.run(q, k[:, keys], v[:, keys], mask=M.ArrayMask(part_mask),
                                   grads=False)
            outs.append(out)
            lses.append(lse)
        assert _all(np.isneginf(lses[2])) and _all(np.asarray(outs[2]) == 0)
        out, lse = _merge_partials(outs, lses)
        r_out, r_lse, _ = self.spec(q, k, v, allowed, grads=False)
        assert max_err(out, r_out) < F32_ATOL
        assert not _all(np.isfinite(r_lse))  # row 3 sees no key in any part
        assert_lse_close(lse, r_lse, F32_ATOL)

    def test_rank3_and_jit(self):
        """Rank-3 inputs (no batch) under jit equal the rank-4 eager call's first row."""
        self.require("float32")
        q, k, v = rand_inputs(15, b=1, t=T, s=S)
        f = functools.partial(jaxattn.dot_product_attention, is_causal=True,
                              implementation=self.impl)
        out3 = jit_for_tests(f)(q[0], k[0], v[0])
        assert out3.shape == (T, 4, 16)
        assert max_err(out3, f(q, k, v)[0]) < F32_ATOL

    def test_outputs_satisfy_the_declared_shape_contract(self):
        """jaxattn.typing's aliases, one binding of B, T, S, N, K, H, Hv over inputs and
        outputs."""
        from jaxattn import typing as jt

        self.require("float32", "lse")
        q, k, v = rand_inputs(18, t=T, s=S, n=4, k=2)
        v = v[..., :12]  # Hv != H
        out, lse, _ = self.run(q, k, v, opts=Opts(is_causal=True), grads=False)
        jt.check_shapes(query=(q, jt.Query), key=(k, jt.Key), value=(v, jt.Value),
                        out=(out, jt.Output), lse=(lse, jt.LSE))
        with pytest.raises(TypeError, match="lse has shape"):
            jt.check_shapes(query=(q, jt.Query), lse=(lse[:, :-1], jt.LSE))
        with pytest.raises(TypeError, match="key has shape"):
            jt.check_shapes(query=(q, jt.Query), key=(k[..., :8], jt.Key))

    @pytest.mark.parametrize("head_dim", [64, 128, 256])
    def test_head_dims_forward(self, head_dim):
        q, k, v = rand_inputs(15, b=1, t=40, s=40, n=2, k=1, h=head_dim)
        self.check_against_spec(q, k, v, opts=Opts(is_causal=True), grads=False)

    # ---- agreement with jax.nn --------------------------------------------------------------

    @pytest.mark.parametrize("heads", list(HEAD_LAYOUTS))
    @pytest.mark.parametrize("case", JAX_NN_CASES)
    def test_matches_jax_nn(self, heads, case):
        n, kh = HEAD_LAYOUTS[heads]
        q, k, v = rand_inputs(1, t=T, s=S, n=n, k=kh)
        r = np.random.default_rng(2)
        mask, bias, opts, kw_jax = None, None, Opts(), {}
        if case == "causal":
            opts, kw_jax = Opts(is_causal=True), dict(is_causal=True)
        elif case == "bias":
            bias = r.normal(size=(2, 1, T, S)).astype(np.float32)
            kw_jax = dict(bias=bias)
        elif case == "mask":
            dense_mask = r.random((1, n, T, S)) > 0.3
            mask, kw_jax = M.ArrayMask(dense_mask), dict(mask=dense_mask)
        elif case == "window":
            mask, kw_jax = M.LocalMask((5, 2)), dict(local_window_size=(5, 2))
        self.require_inputs(q.dtype, bias)
        if case in ("mask", "window"):
            self.require("general_masks")
        out, _, _ = self.run(q, k, v, mask=mask, bias=bias, opts=opts, grads=False)
        ref = _jax_nn_attention(q, k, v, **kw_jax)
        chex.assert_shape(out, (2, T, n, 16))
        chex.assert_trees_all_close(out, ref, atol=F32_ATOL, rtol=0)
