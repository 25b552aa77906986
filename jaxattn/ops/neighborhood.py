"""``jaxattn.neighborhood_attention``: validated, dispatched 1-D/2-D/3-D neighborhood attention.

Semantics are NATTEN's exactly (see :mod:`jaxattn.core.neighborhood`). Arguments are checked and
bound by :func:`jaxattn.ops.call.make_neighborhood_call`. Implementations (one module each in
:mod:`jaxattn.ops.backends`, registered there):

* ``"reference"``: dense ``[L, L]`` mask from the window formulas (the specification).
* ``"xla"``: tiles of queries against their key halo (:mod:`jaxattn.core.neighborhood_xla`), so
  cost and memory grow with ``L * halo``, never ``L * L``. Differentiable by autodiff.
* ``"pallas"``: the fused block-sparse kernel of ``pallas_kernels.neighborhood`` (forward and
  backward with ``custom_vjp``; interpret mode off-GPU/TPU).
"""

from __future__ import annotations

from jaxtyping import Array, Float

from jaxattn.core.neighborhood_xla import default_q_tile, neighborhood_attention_xla
from jaxattn.ops import backends as _backends  # noqa: F401  (registers every backend)
from jaxattn.ops import registry
from jaxattn.ops.backends.neighborhood_pallas import pallas_tables
from jaxattn.ops.call import NEIGHBORHOOD, NeighborhoodCall, make_neighborhood_call

__all__ = ["neighborhood_attention", "explain_neighborhood", "NeighborhoodCall",
           "make_neighborhood_call", "neighborhood_attention_xla", "default_q_tile",
           "pallas_tables", "PRIMITIVE"]

PRIMITIVE = NEIGHBORHOOD


def neighborhood_attention(
    query: Float[Array, "B *spatial N H"],
    key: Float[Array, "B *spatial K H"],
    value: Float[Array, "B *spatial K Hv"],
    kernel_size: int | tuple[int, ...],
    *,
    dilation: int | tuple[int, ...] = 1,
    stride: int | tuple[int, ...] = 1,
    is_causal: bool | tuple[bool, ...] = False,
    scale: float | None = None,
    additional_keys: Float[Array, "B S K H"] | None = None,
    additional_values: Float[Array, "B S K Hv"] | None = None,
    bias: Float[Array, "N ..."] | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
):
    """1-D / 2-D / 3-D neighborhood attention with NATTEN's exact semantics.

    Neighborhood attention (Hassani et al., CVPR 2023), dilated NA (DiNAT, 2022) and strided /
    generalized NA (GNA, Hassani et al., 2025). Each query attends to a ``kernel_size`` window per
    spatial dimension that shifts (never shrinks) at borders; see :mod:`jaxattn.core.neighborhood`
    for the exact window rules.

    Args:
      query: ``[B, *spatial, N, H]`` with 1, 2 or 3 spatial dimensions.
      key: ``[B, *spatial, K, H]``; value: ``[B, *spatial, K, Hv]``; ``N % K == 0`` (GQA/MQA).
      kernel_size: int >= 2 or one per dimension, with ``kernel_size * dilation <= length``.
      dilation: int >= 1 or one per dimension.
      stride: ``1 <= stride <= kernel_size`` per dimension (stride groups share one window).
      is_causal: bool or one per dimension (e.g. ``(True, False, False)`` for video).
      scale: logit scale, default ``H ** -0.5``.
      additional_keys, additional_values: ``[B, S_extra, K, H]`` / ``[B, S_extra, K, Hv]``: extra
        context every query attends to without a mask (merged by LSE, as NATTEN).
      bias: relative-position bias table ``[N, 2k_1-1, ..., 2k_d-1]`` (NATTEN < 0.20 RPB): query
        ``q`` and key ``j`` get ``bias[n, c_j - c_q + k_1 - 1, ...]`` (within-group coordinates).
        It does not apply to the additional keys.
      return_lse: also return the f32 natural-log sum-exp ``[B, *spatial, N]``.
      implementation: ``"reference"``, ``"xla"``, ``"pallas"`` or ``None`` (best that can run
        here; :func:`explain_neighborhood` says which and why).

    Returns:
      ``[B, *spatial, N, Hv]`` in the query dtype (and the LSE with ``return_lse``).

    Raises:
      ValueError / TypeError on bad shapes, dtypes or window arguments.
    """
    call = make_neighborhood_call(
        query, key, value, kernel_size, dilation=dilation, stride=stride, is_causal=is_causal,
        scale=scale, additional_keys=additional_keys, additional_values=additional_values,
        bias=bias, return_lse=return_lse)
    backend = registry.choose(PRIMITIVE, call, implementation)
    out, lse = backend.run(call)
    return (out, lse) if return_lse else out


def explain_neighborhood(*args, **kwargs) -> registry.Explanation:
    """Same arguments as :func:`neighborhood_attention`: which implementation ``None`` picks."""
    kwargs.pop("implementation", None)
    return registry.explain(PRIMITIVE, make_neighborhood_call(*args, **kwargs))
