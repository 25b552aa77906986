"""``jaxattn.tensor_attention``: validated, dispatched tensor (trilinear) attention.

Semantics: :mod:`jaxattn.core.tensor` (Alman & Song 2023). Arguments are checked and bound by
:func:`jaxattn.ops.call.make_tensor_call`. Implementations (one module each in
:mod:`jaxattn.ops.backends`, registered there):

* ``"xla_chunked"``: exact, online softmax over key-pair tiles, memory linear in the lengths,
  custom VJP (:mod:`jaxattn.core.tensor_chunked`); chosen automatically when it can run.
* ``"reference"``: exact, enumerates the ``[T, S, S]`` pairs (the specification).
* ``"polynomial"``: the paper's low-rank approximation, ``O(T r Hv)`` work with
  ``r = C(H + g, g)``; only when named, and refused where its error bound does not hold.
"""

from __future__ import annotations

import dataclasses

from jaxtyping import Array, Float

from jaxattn.ops import backends as _backends  # noqa: F401  (registers every backend)
from jaxattn.ops import registry
from jaxattn.ops.call import TENSOR, make_tensor_call

__all__ = ["tensor_attention", "explain_tensor_attention", "PRIMITIVE"]

PRIMITIVE = TENSOR


def tensor_attention(
    query: Float[Array, "B T N H"],
    key1: Float[Array, "B S K H"],
    key2: Float[Array, "B S K H"],
    value1: Float[Array, "B S K Hv"],
    value2: Float[Array, "B S K Hv"],
    *,
    scale: float | None = None,
    is_causal: bool = False,
    polynomial_degree: int | None = None,
    entry_bound: float | None = None,
    return_lse: bool = False,
    implementation: str | registry.Implementation | None = None,
):
    """Tensor attention: softmax over key *pairs* of a trilinear form (Alman & Song 2023).

    ``out[i] = sum_{j1, j2} softmax_{(j1, j2)}(scale * sum_l q_il k1_{j1 l} k2_{j2 l})
    * (v1_{j1} o v2_{j2})`` ("How to Capture Higher-order Correlations? Generalizing Matrix
    Softmax Attention to Kronecker Computation", Definition 1.2; ``A = exp(Q (K1 (x) K2)^T / d)``,
    ``D^-1 A (V1 (x) V2)`` with row-wise Kronecker products).

    Args:
      query: ``[B, T, N, H]``.
      key1, key2: ``[B, S, K, H]`` with ``N % K == 0`` (GQA: query head ``n`` reads kv head
        ``n // (N / K)``).
      value1, value2: ``[B, S, K, Hv]``.
      scale: logit scale, default ``1 / H`` (the paper's ``1 / d``).
      is_causal: drop pairs with ``j1 > i`` or ``j2 > i`` (needs ``T == S``; the pair
        ``(i, i)`` keeps every row non-empty).
      polynomial_degree: Taylor degree ``g`` for ``implementation="polynomial"`` (only there).
      entry_bound: for ``"polynomial"`` under ``jit``: a promise that every ``|entry|`` of
        ``query``, ``key1``, ``key2`` is ``<= entry_bound`` (checked on device: NaN output if
        broken); concrete inputs do not need it.
      return_lse: also return the f32 log-sum-exp over pairs ``[B, T, N]`` (exact paths only).
      implementation: ``"xla_chunked"``, ``"reference"``, ``"polynomial"``, a
        ``jaxattn.Implementation("xla_chunked", block_q, block_kv)``, or ``None`` (the best exact
        one that can run; :func:`explain_tensor_attention` says which and why).

    Returns:
      ``[B, T, N, Hv]`` in the query dtype (and the LSE with ``return_lse``).

    Raises:
      ValueError / TypeError on bad shapes or dtypes (naming the argument), or when the named
      implementation cannot run the call (with the reason).
    """
    call = make_tensor_call(query, key1, key2, value1, value2, scale=scale, is_causal=is_causal,
                            polynomial_degree=polynomial_degree, entry_bound=entry_bound,
                            return_lse=return_lse)
    impl = registry.as_implementation(implementation)
    name = None if impl is None else impl.name
    if name != "polynomial" and (polynomial_degree is not None or entry_bound is not None):
        raise ValueError("polynomial_degree and entry_bound apply only to "
                         f"implementation='polynomial', got implementation={name!r}")
    if impl is not None and impl.has_tiles:
        call = dataclasses.replace(call, block_q=impl.block_q, block_kv=impl.block_kv)
    out, lse = registry.choose(PRIMITIVE, call, impl).run(call)
    return (out, lse) if return_lse else out


def explain_tensor_attention(*args, **kwargs) -> registry.Explanation:
    """Same arguments as :func:`tensor_attention`: which implementation ``None`` would run and
    each other's verdict."""
    kwargs.pop("implementation", None)
    return registry.explain(PRIMITIVE, make_tensor_call(*args, **kwargs))
