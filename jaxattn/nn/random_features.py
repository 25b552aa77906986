"""Random-feature attention (RFA): a single multi-head attention layer whose query-key matrices
are frozen random draws and whose value vectors are the only trained weights.

Fu, Guo, Bai, Mei, "What can a Single Attention Layer Learn? A Study Through the Random Features
Lens", NeurIPS 2023 (arXiv 2307.11353). The layer reads one query token ``x_0`` and ``N`` key
tokens ``x_1..x_N`` (each in ``R^d``), augments every token with a constant, ``x~ = [x; 1]``,
and predicts the scalar

    f(x_{0:N}) = sum_{m=1..M} (1/N) sum_{i=1..N} exp(x~_0^T W_m x~_i) <v_m, x~_i>        (RFA)

with ``W_m in R^{(d+1)x(d+1)}`` (head ``m``'s ``W_Q^T W_K``) drawn once and frozen and
``v_m in R^{d+1}`` trained. ``exp`` is the softmax numerator; the ``1/N`` average stands in for the
softmax denominator. This is the paper's random-feature attention model as written in the
project's spec (``shared/papers/mechanisms.md`` section 15); the paper's own text was not
available to check the equation number or constants against, so none is quoted here.

Because ``f`` is linear in ``V = (v_1..v_M)``, fitting it is a convex problem: ridge regression on
the features ``Phi_m(x_{0:N}) = (1/N) sum_i exp(x~_0^T W_m x~_i) x~_i in R^{d+1}``, concatenated
over heads into ``M (d+1)`` features (:func:`rfa_features`; ``f = <Phi, vec V>``).

Samplings of ``W`` (:func:`sample_rfa_weights`): zero-mean, ``W_m ~ N(0, sigma^2)`` entrywise,
and identity-biased, ``W_m ~ W_0 + N(0, sigma^2)`` with ``W_0 = blockdiag(I_d, 0)`` (so the
mean score is ``<x_0, x_i>``). The comparator is a two-layer random-feature ReLU MLP on the
flattened tokens (:func:`rfmlp_features`), fitted the same way.

Numerics. Everything is computed in float32 with ``precision="highest"`` matmuls (TPU/GPU
default matmul precision would round the inputs of ``exp`` to bf16/tf32). For unit-norm tokens
``||x~||^2 = 2``, so the zero-mean score ``x~_0^T W x~_i`` is ``N(0, 4 sigma^2)`` (biased: mean
``<x_0, x_i>`` in ``[-1, 1]``). The default ``sigma = 1/2`` makes it unit-variance, inside the
spec's ``c / sqrt(d + 1)``, ``c <= 2`` range for ``d = 8`` (``c = 1.5``). ``exp`` overflows
float32 at a score of about 88, i.e. 44 standard deviations at ``sigma = 1``, 22 at 2; keep
the score's standard deviation ``sigma ||x~_0|| ||x~_i||`` of order 1 (scale the inputs, not the
scores: a max-shift would change ``f``, which has no softmax denominator to cancel it).
:func:`ridge_fit` solves in float32 by Cholesky on the smaller of the primal ``p x p`` and dual
``n x n`` systems; the condition number of ``K + n lam I`` is at most ``1 + mean_j
||phi_j||^2 / lam``, which float32 handles while it stays well below ``1/eps ~ 1e7``. That bound
is a worst case: on the experiment's features (d = 8, M = 512) the float32 solve matched a
float64 one to 3 digits down to ``lam = 1e-10`` times the mean squared feature norm. A failed
factorisation shows as NaN weights.

Not a token mixer: the layer maps a query and a set of keys to one scalar (a query-vs-set
regression model with a fixed ``exp`` kernel and no query/key/output projections), not
``[B, L, D] -> [B, L, D]``. Forcing it into the mixer slot would need a choice of which token is
the query and an invented output projection, and the mixer conformance suite (causality, cross
attention, bf16) would test properties the paper never claims, so it is not registered in
``jaxattn.nn.MIXERS``; :class:`RandomFeatureAttention` is trained directly by the shared loop.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.nn.params import logical_param

__all__ = [
    "FrozenWeight",
    "RandomFeatureAttention",
    "augment",
    "identity_bias",
    "rfa_features",
    "rfa_predict",
    "rfa_reference",
    "rfmlp_features",
    "ridge_fit",
    "ridge_solve",
    "sample_rfa_weights",
    "sample_rfmlp_weights",
]

_HIGHEST = jax.lax.Precision.HIGHEST
BIASES = ("zero", "identity")


# ---- checks -----------------------------------------------------------------------------------
def _check_tokens(x0, xs) -> tuple[int, int, int]:
    """``(B, N, d)`` of a query ``x0 [B, d]`` and keys ``xs [B, N, d]``; ValueError otherwise."""
    s0, ss = tuple(np.shape(x0)), tuple(np.shape(xs))
    if len(s0) != 2 or len(ss) != 3:
        raise ValueError(f"x0 must be [B, d] and xs [B, N, d]; got x0 {s0} and xs {ss}")
    if s0[0] != ss[0] or s0[1] != ss[2]:
        raise ValueError(f"x0 [B, d] and xs [B, N, d] must agree in B and d; got x0 {s0} and "
                         f"xs {ss}")
    if ss[1] < 1:
        raise ValueError(f"xs needs at least one key token (N >= 1); got xs {ss}")
    return ss[0], ss[1], ss[2]


def _check_weights(W, d: int) -> int:
    sw = tuple(np.shape(W))
    if len(sw) != 3 or sw[1:] != (d + 1, d + 1):
        raise ValueError(f"W must be [M, d+1, d+1] = [M, {d + 1}, {d + 1}] for tokens of "
                         f"dimension d={d}; got W {sw}")
    return sw[0]


def _check_sampling(num: int, name: str, sigma: float | None = None) -> None:
    if not isinstance(num, int | np.integer) or num < 1:
        raise ValueError(f"{name} must be a positive int, got {num!r}")
    if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite float >= 0, got {sigma!r}")


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


# ---- the model --------------------------------------------------------------------------------
def augment(x) -> jax.Array:
    """``x~ = [x; 1]``: ``[..., d] -> [..., d+1]`` float32 (the paper's augmented token)."""
    x = _f32(x)
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), jnp.float32)], axis=-1)


def identity_bias(dim: int) -> jax.Array:
    """``W_0 = blockdiag(I_d, 0)``, ``[d+1, d+1]`` float32: ``x~_0^T W_0 x~_i = <x_0, x_i>``."""
    _check_sampling(dim, "dim")
    eye = jnp.eye(dim, dtype=jnp.float32)
    return jnp.zeros((dim + 1, dim + 1), jnp.float32).at[:dim, :dim].set(eye)


def sample_rfa_weights(key: jax.Array, *, num_heads: int, dim: int, bias: str = "zero",
                       sigma: float = 0.5) -> jax.Array:
    """Frozen query-key matrices ``W [M, d+1, d+1]`` float32, i.i.d. over heads and entries.

    Args:
      key: a PRNG key.
      num_heads: ``M``.
      dim: token dimension ``d`` (the matrices act on augmented ``d+1`` tokens).
      bias: ``"zero"``: ``W_m ~ N(0, sigma^2)`` entrywise; ``"identity"``: ``W_m = W_0 + the
        same Gaussian`` with ``W_0 = blockdiag(I_d, 0)`` (:func:`identity_bias`), so for one key
        the two samplings differ by exactly ``W_0``.
      sigma: entry standard deviation (see the module docstring for the overflow budget).
    """
    _check_sampling(num_heads, "num_heads", sigma)
    _check_sampling(dim, "dim")
    if bias not in BIASES:
        raise ValueError(f"bias must be one of {BIASES}, got {bias!r}")
    noise = sigma * jax.random.normal(key, (num_heads, dim + 1, dim + 1), jnp.float32)
    if bias == "identity":
        noise = noise + identity_bias(dim)[None]
    return noise


def rfa_reference(x0, xs, W, v) -> jax.Array:
    """Equation (RFA) written out: ``f = sum_m (1/N) sum_i exp(x~_0^T W_m x~_i) <v_m, x~_i>``.

    Args: ``x0 [B, d]``, ``xs [B, N, d]``, ``W [M, d+1, d+1]``, ``v [M, d+1]``.
    Returns: ``[B]`` float32. The specification that :func:`rfa_features` and the module are
    tested against; not optimised.
    """
    B, N, d = _check_tokens(x0, xs)
    M = _check_weights(W, d)
    if tuple(np.shape(v)) != (M, d + 1):
        raise ValueError(f"v must be [M, d+1] = [{M}, {d + 1}]; got v {tuple(np.shape(v))}")
    q, k = augment(x0), augment(xs)
    scores = jnp.einsum("bj,mjl,bil->bmi", q, _f32(W), k, precision=_HIGHEST)  # x~0^T W_m x~i
    values = jnp.einsum("mj,bij->bmi", _f32(v), k, precision=_HIGHEST)  # <v_m, x~_i>
    return jnp.sum(jnp.exp(scores) * values, axis=(1, 2)) / N


def rfa_features(x0, xs, W) -> jax.Array:
    """The RFA features ``Phi [B, M*(d+1)]`` float32, head-major: ``Phi[b, m*(d+1) + j] =
    (1/N) sum_i exp(x~_0^T W_m x~_i) x~_{i,j}``, so ``f = Phi @ v.reshape(-1)`` for ``v [M, d+1]``.

    Args: ``x0 [B, d]`` query tokens, ``xs [B, N, d]`` key tokens, ``W [M, d+1, d+1]``.
    Cost ``O(B M (d+1) (N + d))``; memory ``B M N`` scores (chunk the batch for large inputs).
    """
    B, N, d = _check_tokens(x0, xs)
    M = _check_weights(W, d)
    q, k = augment(x0), augment(xs)
    qw = jnp.einsum("bj,mjl->bml", q, _f32(W), precision=_HIGHEST)  # x~_0^T W_m, [B, M, d+1]
    scores = jnp.einsum("bml,bil->bmi", qw, k, precision=_HIGHEST)  # [B, M, N]
    phi = jnp.einsum("bmi,bij->bmj", jnp.exp(scores), k, precision=_HIGHEST) / N
    return phi.reshape(B, M * (d + 1))


def rfa_predict(features, v) -> jax.Array:
    """``f = Phi @ vec(V)``: ``features [B, P]`` and ``v`` ``[M, d+1]`` (per-head values, head
    major, ``M (d+1) = P``) or flat ``[P]`` (e.g. from :func:`ridge_fit`) -> ``[B]`` float32."""
    sf, sv = tuple(np.shape(features)), tuple(np.shape(v))
    if len(sf) != 2 or len(sv) not in (1, 2) or math.prod(sv) != sf[1]:
        raise ValueError(f"features must be [B, P] and v [M, d+1] or [P] with M*(d+1) = P; got "
                         f"features {sf} and v {sv}")
    return jnp.matmul(_f32(features), _f32(v).reshape(-1), precision=_HIGHEST)


# ---- the comparator: random-feature ReLU MLP on the flattened tokens --------------------------
def sample_rfmlp_weights(key: jax.Array, *, in_dim: int, num_features: int) -> jax.Array:
    """First-layer weights ``U [in_dim + 1, F]`` float32, i.i.d. ``N(0, 1)`` (the last row is the
    bias, which multiplies the constant 1 appended by :func:`rfmlp_features`).

    ``in_dim = (N + 1) d`` for ``N`` keys of dimension ``d``; use ``F = M (d+1)`` to compare with
    an ``M``-head RFA at equal numbers of features (= trained weights)."""
    _check_sampling(in_dim, "in_dim")
    _check_sampling(num_features, "num_features")
    return jax.random.normal(key, (in_dim + 1, num_features), jnp.float32)


def rfmlp_features(x0, xs, U) -> jax.Array:
    """Two-layer random-feature ReLU MLP features ``[B, F]`` float32 of the flattened input.

    ``z = [x_0; x_1; ...; x_N] / sqrt(N+1)`` (unit norm for unit-norm tokens, as ``x`` in
    ``x~ = [x; 1]``), ``z~ = [z; 1]``, features ``relu(z~ @ U)``. The MLP ``sum_f a_f relu(<u_f,
    z~>)`` is linear in the trained second layer ``a``, fitted like RFA (:func:`ridge_fit`).
    Unlike RFA it is not permutation invariant in the keys: it has to learn that from data.

    Args: ``x0 [B, d]``, ``xs [B, N, d]``, ``U [(N+1) d + 1, F]``.
    """
    B, N, d = _check_tokens(x0, xs)
    su = tuple(np.shape(U))
    if len(su) != 2 or su[0] != (N + 1) * d + 1:
        raise ValueError(f"U must be [(N+1)*d + 1, F] = [{(N + 1) * d + 1}, F] for N={N} keys "
                         f"of dimension d={d}; got U {su}")
    z = jnp.concatenate([_f32(x0), _f32(xs).reshape(B, N * d)], axis=-1) / math.sqrt(N + 1)
    z = jnp.concatenate([z, jnp.ones((B, 1), jnp.float32)], axis=-1)
    return jax.nn.relu(jnp.matmul(z, _f32(U), precision=_HIGHEST))


# ---- closed-form ridge ------------------------------------------------------------------------
def _check_positive(lam) -> None:
    try:
        concrete = np.asarray(lam, np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: the caller's responsibility
    if not np.all(concrete > 0):
        raise ValueError(f"lam must be > 0, got {lam!r}")


@jax.jit
def _cholesky_path(gram: jax.Array, rhs: jax.Array, n: jax.Array, lams: jax.Array) -> jax.Array:
    eye = jnp.eye(gram.shape[0], dtype=jnp.float32)

    def one(lam):
        c = jax.scipy.linalg.cho_factor(gram + (n * lam) * eye, lower=True)
        return jax.scipy.linalg.cho_solve(c, rhs)

    return jax.lax.map(one, lams)  # one factorisation at a time: L copies never coexist


def ridge_solve(gram, rhs, n: int, lam) -> jax.Array:
    """Cholesky solves of ``(gram + n lam I) x = rhs`` for every ``lam`` of a grid: the linear
    algebra of :func:`ridge_fit`, for callers that build the Gram matrix themselves (e.g.
    accumulate ``Phi^T Phi`` over nested training prefixes).

    Args: ``gram [m, m]`` symmetric PSD (only its lower triangle is read), ``rhs [m, K]``,
    ``n`` the number of training rows behind ``gram``, ``lam [L]`` (> 0).
    Returns: ``[L, m, K]`` float32.
    """
    sg, sr, sl = tuple(np.shape(gram)), tuple(np.shape(rhs)), tuple(np.shape(lam))
    if len(sg) != 2 or sg[0] != sg[1] or len(sr) != 2 or sr[0] != sg[0] or len(sl) != 1:
        raise ValueError(f"gram must be [m, m], rhs [m, K] and lam [L]; got gram {sg}, rhs {sr} "
                         f"and lam {sl}")
    _check_positive(lam)
    return _cholesky_path(_f32(gram), _f32(rhs), jnp.float32(n), _f32(lam))


@jax.jit
def _ridge_solve(phi: jax.Array, y: jax.Array, lams: jax.Array) -> jax.Array:
    """``[L, P, K]`` ridge weights for ``phi [n, P]``, ``y [n, K]``, ``lams [L]``."""
    n, p = phi.shape
    if n >= p:  # primal: (Phi^T Phi + n lam I) w = Phi^T y
        gram = jnp.matmul(phi.T, phi, precision=_HIGHEST)
        rhs = jnp.matmul(phi.T, y, precision=_HIGHEST)
        return _cholesky_path(gram, rhs, jnp.float32(n), lams)
    # dual: w = Phi^T (Phi Phi^T + n lam I)^{-1} y
    alpha = _cholesky_path(jnp.matmul(phi, phi.T, precision=_HIGHEST), y, jnp.float32(n), lams)
    return jnp.einsum("np,lnk->lpk", phi, alpha, precision=_HIGHEST)


def ridge_fit(features, y, lam) -> jax.Array:
    """Closed-form ridge regression ``argmin_w (1/n) ||y - Phi w||^2 + lam ||w||^2`` (no
    intercept: RFA's ``x~`` already carries a constant), the paper's convex fit of ``V``.

    Solved by Cholesky in float32 on the smaller system: primal ``(Phi^T Phi + n lam I) w =
    Phi^T y`` when ``n >= P``, else dual ``w = Phi^T (Phi Phi^T + n lam I)^{-1} y``; one Gram
    matrix is shared by every ``lam`` of a grid. See the module docstring for the choice of
    ``lam`` (NaN weights: ``lam`` too small for float32).

    Args:
      features: ``Phi [n, P]``.
      y: targets ``[n]`` or ``[n, K]`` (several targets share the factorisation).
      lam: ``lam > 0``, a scalar or a 1-D grid ``[L]``.

    Returns:
      float32 ``w`` of shape ``[P]`` / ``[P, K]``, or ``[L, P]`` / ``[L, P, K]`` for a grid.
    """
    sf, sy = tuple(np.shape(features)), tuple(np.shape(y))
    if len(sf) != 2 or len(sy) not in (1, 2) or sy[0] != sf[0]:
        raise ValueError(f"features must be [n, P] and y [n] or [n, K] with the same n; got "
                         f"features {sf} and y {sy}")
    lam_shape = tuple(np.shape(lam))
    if len(lam_shape) > 1:
        raise ValueError(f"lam must be a scalar or a 1-D grid; got shape {lam_shape}")
    _check_positive(lam)
    y2 = _f32(y).reshape(sy[0], -1)
    w = _ridge_solve(_f32(features), y2, _f32(lam).reshape(-1))  # [L, P, K]
    w = w.reshape(w.shape[:2] + sy[1:])
    return w if lam_shape else w[0]


# ---- the NNX shell ----------------------------------------------------------------------------
class FrozenWeight(nnx.Variable):
    """A fixed random weight. Not an ``nnx.Param``: the shared loop differentiates and updates
    only ``nnx.Param`` (``nnx.split(model, nnx.Param, ...)``), so it is carried unchanged in the
    non-trainable state."""


class RandomFeatureAttention(nnx.Module):
    """RFA (Fu et al., NeurIPS 2023) with ``M`` heads: frozen ``W`` (:class:`FrozenWeight`,
    drawn from ``rngs.params()`` by :func:`sample_rfa_weights`) and trained values ``v [M, d+1]``
    (``nnx.Param``, zeros at init: the model starts at ``f = 0``).

    ``model(x0 [B, d], xs [B, N, d]) -> [B]`` is equation (RFA), computed as
    ``rfa_predict(rfa_features(x0, xs, W), v)``. ``v`` can be trained by the shared loop or set
    to a ridge solution: ``model.v[...] = ridge_fit(model.features(x0, xs), y, lam).reshape(
    model.v.shape)``.
    """

    def __init__(self, dim: int, num_heads: int, *, bias: str = "zero", sigma: float = 0.5,
                 rngs: nnx.Rngs):
        self.dim, self.num_heads, self.bias, self.sigma = dim, num_heads, bias, sigma
        self.W = FrozenWeight(sample_rfa_weights(rngs.params(), num_heads=num_heads, dim=dim,
                                                 bias=bias, sigma=sigma))
        self.v = logical_param(rngs, nnx.initializers.zeros, (num_heads, dim + 1), jnp.float32,
                               ("heads", None))

    def features(self, x0, xs) -> jax.Array:
        """``rfa_features(x0, xs, W)``: ``[B, M (d+1)]``."""
        return rfa_features(x0, xs, self.W[...])

    def __call__(self, x0, xs) -> jax.Array:
        return rfa_predict(self.features(x0, xs), self.v[...])
