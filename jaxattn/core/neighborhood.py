"""Reference neighborhood attention (NATTEN semantics): the specification for every NA path.

Neighborhood attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023), dilated
NA ("Dilated Neighborhood Attention Transformer", 2022), and strided / generalized NA (Hassani et
al., "Generalized Neighborhood Attention", 2025), with the exact window rules of NATTEN's CUDA
reference mask (``csrc/include/natten/cuda/reference/mask.hpp``). The N-D mask is the AND of one
1-D mask per spatial dimension. In each dimension, with kernel ``k``, dilation ``d``, stride ``s``:

* dilation splits the axis into ``d`` groups: coordinate ``x`` is in group ``x % d`` with
  within-group coordinate ``c = x // d``; group ``g`` has ``L_g = ceil((L - g) / d)`` tokens and a
  query only sees keys of its own group. All window arithmetic below uses ``(c, L_g)``.
* ``wl = k // 2`` keys on the left, ``wr = k // 2 + k % 2 - 1`` on the right (even ``k``
  leans left).
* non-causal: ``leader = min(c // s * s + s // 2, L_g - 1)``;
  ``start = clip(leader - wl, 0, L_g - k)``; ``end = start + k`` (windows shift at borders, so every
  query sees exactly ``k`` keys per dimension).
* causal: ``leader = min(c // s * s + s - 1, L_g - 1)``; ``start = max(leader - k + 1, 0)``;
  ``end = min(c + 1, L_g)`` (the query's own causal bound).

Queries in one stride group share their leader's window. Additional keys/values (a context every
query sees unmasked) join the softmax, which equals NATTEN's LSE merge of two attentions.

The optional relative-position bias (RPB, removed from NATTEN in 0.20) is a table
``[N, 2k_1-1, ..., 2k_d-1]``; the bias of query ``q`` and key ``j`` is
``table[n, (c_j - c_q) + k_1 - 1, ...]`` in within-group coordinates, as in NATTEN < 0.20.

This file materialises the dense ``[L, L]`` mask and is meant to be read, not to be fast.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxattn.core import dense

__all__ = [
    "NeighborhoodParams",
    "normalize_params",
    "window_bounds_1d",
    "neighborhood_mask_1d",
    "neighborhood_mask",
    "relative_position_index_1d",
    "neighborhood_bias",
    "neighborhood_attention_reference",
]


@dataclasses.dataclass(frozen=True)
class NeighborhoodParams:
    """Per-dimension NA parameters (tuples of length ``ndim``)."""

    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)


def _per_dim(name: str, value, ndim: int, kind):
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(
                f"{name} has {len(value)} entries but the input has {ndim} spatial dimensions: "
                f"{tuple(value)}"
            )
        values = tuple(value)
    else:
        values = (value,) * ndim
    for v in values:
        if kind is bool:
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool or a tuple of bools, got {value!r}")
        elif isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {value!r}")
    return tuple(kind(v) for v in values)


def normalize_params(
    spatial_shape, kernel_size, dilation=1, stride=1, is_causal=False
) -> NeighborhoodParams:
    """Broadcast ints to tuples and check NATTEN's argument rules against ``spatial_shape``.

    Raises ``ValueError`` unless, per dimension, ``kernel_size >= 2``, ``dilation >= 1``,
    ``kernel_size * dilation <= length`` and ``1 <= stride <= kernel_size``; ``TypeError`` for
    non-integer (or non-bool ``is_causal``) arguments.
    """
    spatial_shape = tuple(int(x) for x in spatial_shape)
    ndim = len(spatial_shape)
    if ndim not in (1, 2, 3):
        raise ValueError(f"neighborhood attention takes 1, 2 or 3 spatial dims, got {ndim}")
    k = _per_dim("kernel_size", kernel_size, ndim, int)
    d = _per_dim("dilation", dilation, ndim, int)
    s = _per_dim("stride", stride, ndim, int)
    c = _per_dim("is_causal", is_causal, ndim, bool)
    for i in range(ndim):
        if k[i] < 2:
            raise ValueError(f"kernel_size must be >= 2 in every dimension, got {k}")
        if d[i] < 1:
            raise ValueError(f"dilation must be >= 1 in every dimension, got {d}")
        if k[i] * d[i] > spatial_shape[i]:
            raise ValueError(
                f"kernel_size * dilation must be <= the length in every dimension: dimension {i} "
                f"has kernel_size {k[i]} * dilation {d[i]} = {k[i] * d[i]} > length "
                f"{spatial_shape[i]} (spatial shape {spatial_shape})"
            )
        if not 1 <= s[i] <= k[i]:
            raise ValueError(
                f"stride must satisfy 1 <= stride <= kernel_size in every dimension, got stride "
                f"{s} for kernel_size {k}"
            )
    return NeighborhoodParams(k, d, s, c)


def window_bounds_1d(length: int, kernel_size: int, dilation: int = 1, stride: int = 1,
                     is_causal: bool = False):
    """Window ``[start, end)`` of every query along one axis, in within-group coordinates.

    Returns ``(group [L], coord [L], start [L], end [L])`` int numpy arrays: the dilation group
    ``x % d`` and within-group coordinate ``x // d`` of each query ``x``, and its key window (keys
    of the same group whose within-group coordinate lies in ``[start, end)``).
    """
    x = np.arange(length)
    g, c = x % dilation, x // dilation
    lg = -(-(length - g) // dilation)  # ceil((L - g) / d): tokens in this query's group
    k, s = kernel_size, stride
    if is_causal:
        leader = np.minimum(c // s * s + s - 1, lg - 1)
        start = np.maximum(leader - (k - 1), 0)
        end = np.minimum(c + 1, lg)
    else:
        leader = np.minimum(c // s * s + s // 2, lg - 1)
        start = np.clip(leader - k // 2, 0, lg - k)
        end = start + k
    return g, c, start, end


def neighborhood_mask_1d(length: int, kernel_size: int, dilation: int = 1, stride: int = 1,
                         is_causal: bool = False) -> np.ndarray:
    """Boolean ``[L, L]`` mask (rows = queries, columns = keys) of 1-D neighborhood attention."""
    g, c, start, end = window_bounds_1d(length, kernel_size, dilation, stride, is_causal)
    same_group = g[:, None] == g[None, :]
    inside = (c[None, :] >= start[:, None]) & (c[None, :] < end[:, None])
    return same_group & inside


def neighborhood_mask(spatial_shape, kernel_size, dilation=1, stride=1,
                      is_causal=False) -> np.ndarray:
    """Boolean ``[L, L]`` mask, ``L = prod(spatial_shape)``, tokens in row-major order.

    The AND of the per-dimension 1-D masks (a Kronecker product)."""
    p = normalize_params(spatial_shape, kernel_size, dilation, stride, is_causal)
    mask = np.ones((1, 1), bool)
    for i, length in enumerate(spatial_shape):
        m1 = neighborhood_mask_1d(length, p.kernel_size[i], p.dilation[i], p.stride[i],
                                  p.is_causal[i])
        mask = np.kron(mask, m1).astype(bool)
    return mask


def relative_position_index_1d(length: int, kernel_size: int, dilation: int = 1) -> np.ndarray:
    """``[L, L]`` RPB table index ``(c_key - c_query) + k - 1`` (within-group coordinates).

    Only meaningful where the 1-D mask is True (then it lies in ``[0, 2k - 2]``); clipped there
    elsewhere so it can always be used to gather."""
    c = np.arange(length) // dilation
    return np.clip(c[None, :] - c[:, None] + kernel_size - 1, 0, 2 * kernel_size - 2)


def neighborhood_bias(table, spatial_shape, kernel_size, dilation=1):
    """Expand an RPB table ``[N, 2k_1-1, ...]`` into a dense bias ``[N, L, L]`` (f32)."""
    ndim = len(spatial_shape)
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * ndim
    ds = dilation if isinstance(dilation, tuple) else (dilation,) * ndim
    idx = [relative_position_index_1d(spatial_shape[i], ks[i], ds[i]) for i in range(ndim)]
    # Broadcast the per-dimension [L_i, L_i] indices to [L_1, ..., L_d, L_1, ..., L_d].
    grids = []
    for i in range(ndim):
        shape = [1] * (2 * ndim)
        shape[i], shape[ndim + i] = spatial_shape[i], spatial_shape[i]
        grids.append(idx[i].reshape(shape))
    n = table.shape[0]
    full = table.astype(jnp.float32)[(slice(None), *grids)]  # [N, *spatial, *spatial]
    total = int(np.prod(spatial_shape))
    return full.reshape(n, total, total)


def neighborhood_attention_reference(
    query,
    key,
    value,
    kernel_size,
    *,
    dilation=1,
    stride=1,
    is_causal=False,
    scale: float | None = None,
    additional_keys=None,
    additional_values=None,
    bias=None,
    return_lse: bool = False,
):
    """Neighborhood attention with a dense mask (the specification).

    Args:
      query: ``[B, *spatial, N, H]`` with 1, 2 or 3 spatial dimensions.
      key: ``[B, *spatial, K, H]``; value ``[B, *spatial, K, Hv]`` (GQA: ``N % K == 0``).
      kernel_size, dilation, stride, is_causal: int/bool or one per spatial dimension.
      scale: default ``H ** -0.5``.
      additional_keys, additional_values: ``[B, S_extra, K, H]`` / ``[B, S_extra, K, Hv]``, seen by
        every query without a mask.
      bias: RPB table ``[N, 2k_1-1, ..., 2k_d-1]`` (not applied to additional keys).
      return_lse: also return the f32 natural-log LSE ``[B, *spatial, N]``.

    Returns ``[B, *spatial, N, Hv]`` in ``query.dtype`` (and the LSE). No validation here;
    :func:`jaxattn.neighborhood_attention` does it.
    """
    b, *spatial, n, h = query.shape
    spatial = tuple(spatial)
    p = normalize_params(spatial, kernel_size, dilation, stride, is_causal)
    total = int(np.prod(spatial))
    q = query.reshape(b, total, n, h)
    k = key.reshape(b, total, key.shape[-2], key.shape[-1])
    v = value.reshape(b, total, value.shape[-2], value.shape[-1])
    mask = neighborhood_mask(spatial, p.kernel_size, p.dilation, p.stride, p.is_causal)
    logit_bias = None
    if bias is not None:
        logit_bias = neighborhood_bias(bias, spatial, p.kernel_size, p.dilation)  # [N, L, L]
    if additional_keys is not None:
        extra = additional_keys.shape[1]
        k = jnp.concatenate([k, additional_keys], axis=1)
        v = jnp.concatenate([v, additional_values], axis=1)
        mask = np.concatenate([mask, np.ones((total, extra), bool)], axis=1)
        if logit_bias is not None:
            logit_bias = jnp.concatenate(
                [logit_bias, jnp.zeros((n, total, extra), jnp.float32)], axis=2)
    if logit_bias is not None:
        logit_bias = logit_bias[None]  # [1, N, L, S]
    out, lse = dense.attention_reference(q, k, v, logit_bias, mask, scale=scale, return_lse=True)
    out = out.reshape(b, *spatial, n, value.shape[-1])
    if return_lse:
        return out, lse.reshape(b, *spatial, n)
    return out
