"""``implementation="cudnn"`` for ``dot_product_attention``: ``jax.nn``'s cuDNN flash attention.

Refuses, because ``jax.nn.dot_product_attention(implementation="cudnn")`` cannot run them:

* any platform but GPU;
* dtypes other than bfloat16 / float16;
* head dims with ``H != Hv``, ``H`` not a multiple of 8, or ``H > 256``;
* soft-cap, sinks, segment ids, dropout and ``return_lse`` (the ``jax.nn`` entry point has none);
* masks other than none, causal, or a causal sliding window (``LocalMask((left, 0))``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn import masks as masks_lib
from jaxattn.ops import registry
from jaxattn.ops.call import AttentionCall

__all__ = ["supports", "run", "BACKEND"]


def _mask_args(mask) -> dict | str:
    """Map a structured mask onto jax.nn's cuDNN arguments, or return a refusal string."""
    if mask is None:
        return dict(is_causal=False)
    if mask == masks_lib.CausalMask():
        return dict(is_causal=True)
    if isinstance(mask, masks_lib.LocalMask) and mask.offset == 0 and mask.window[1] == 0:
        left = mask.window[0]
        if left is None:
            return dict(is_causal=True)
        return dict(is_causal=True, local_window_size=(left, 0))
    return f"cuDNN supports only causal / causal sliding-window masks here, not {mask!r}"


def supports(c: AttentionCall) -> str | None:
    """``None`` if cuDNN can run ``c`` here, else the first refusal of the module docstring."""
    if c.platform != "gpu":
        return f"cuDNN needs a GPU, this call runs on {c.platform!r}"
    if c.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bf16/fp16, got {c.dtype}"
    d = c.shape
    if d["H"] != d["Hv"] or d["H"] % 8 or d["H"] > 256:
        return f"cuDNN needs H == Hv, a multiple of 8 and <= 256 (H={d['H']}, Hv={d['Hv']})"
    for what, bad in (("soft-cap", c.logits_soft_cap is not None), ("sinks", c.sinks is not None),
                      ("segment ids", c.q_segment_ids is not None),
                      ("dropout", c.dropout_rate > 0), ("return_lse", c.return_lse),
                      ("score_mod", c.score_mod is not None)):
        if bad:
            return f"jax.nn's cuDNN path has no {what}"
    args = _mask_args(c.mask)
    return args if isinstance(args, str) else None


def run(c: AttentionCall):
    """``(out [B, T, N, Hv], None)``: the cuDNN path returns no LSE."""
    out = jax.nn.dot_product_attention(
        c.query, c.key, c.value, c.bias, scale=c.scale, implementation="cudnn",
        **_mask_args(c.mask),
    )
    return out, None


BACKEND = registry.Backend("cudnn", run, supports=supports, priority=30)
