"""``implementation="pallas"`` for ``dot_product_attention``: the block-sparse Pallas flash kernels.

Refuses, with the reason in ``explain()``:

* a traced ``scale`` (a static kernel parameter);
* dtypes other than float32 / bfloat16 / float16;
* a mask holding traced arrays (its block structure must be known at trace time; packed documents
  go in as segment ids, which the kernels read as arrays);
* platforms without a Pallas lowering (anything but CPU, GPU, TPU);
* on GPU / TPU, head dims outside 64 / 128 / 256;
* on TPU, calls whose block metadata overflows SMEM or whose K and V of one kv head overflow VMEM;
* ``score_mod_args`` on GPU / TPU (indexing an argument, as ALiBi's ``slopes[h]`` or a table
  lookup, does not lower for Triton / Mosaic TPU; argument-free score functions do), and on CPU
  ``score_mod_args`` whose per-tile partial gradients (``B * N * num_q_blocks`` copies of the
  arguments, see below) would exceed ``_MAX_MOD_GRAD_ELEMENTS``.

An additive ``bias`` ``[B|1, N|1, T|1, S|1]`` goes to the kernels as is (broadcast dims are
never materialised; ``dbias`` comes from a dedicated kernel that reduces them). A ``score_mod``
is evaluated per tile inside the forward, dq, dk/dv (and dbias) kernels on the tile's index
grids; the gradients of its floating ``score_mod_args`` are accumulated by the dq kernel as
per-(batch, head, query tile) partial sums reduced in XLA. Bias and argument-free score
functions lower for Triton and Mosaic TPU (checked from CPU; never run on a device).

Automatic selection never picks it on CPU (the kernels run in the slow Pallas interpreter there)
nor on GPU / TPU until ``HARDWARE_VALIDATED`` is set after the tests pass on the device: the
Mosaic-GPU, Triton and Mosaic-TPU lowerings are checked from CPU but have never run on a device.
``implementation="pallas"`` opts in.

The adapter turns an :class:`~jaxattn.ops.call.AttentionCall` into kernel arguments: the
structured mask becomes block metadata on the host (``Mask.block_info`` -> visit lists, cached per
mask and shape), segment ids stay arrays (evaluated per tile inside the kernel, so packed
documents need no ``[T, S]`` mask), GQA, soft-cap, sinks and unaligned lengths go straight to the
kernel. Dropout uses the reference's position-hash mask (the kernels regenerate it per tile). On
GPU the forward is the Hopper Mosaic-GPU kernel when it applies (bf16/f16, head dims 64/128/256, no
segment ids, sinks, dropout, bias or score_mod), else the Triton lowering; the backward is
Triton-lowered.

``pallas_kernels.flash`` (and with it ``jax.experimental.pallas.mosaic_gpu``) is imported on first
use (:func:`flash_kernels`), not when ``jaxattn`` is imported.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxattn import masks as masks_lib
from jaxattn.core import dropout as dropout_lib
from jaxattn.ops import registry
from jaxattn.ops.call import AttentionCall

if TYPE_CHECKING:
    from pallas_kernels.flash import BlockSparseMeta, FlashConfig

__all__ = ["run", "supports", "prefer", "flash_config_for", "meta_for", "flash_kernels",
           "HARDWARE_VALIDATED", "BACKEND"]

# Flip to True once the GPU / TPU lowerings have passed the test suite on the device.
HARDWARE_VALIDATED = False

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_HW_HEAD_DIMS = (64, 128, 256)
DEFAULT_BLOCK = 128
# Cap on the dq kernel's partial gradients of score_mod_args: B * N * num_q_blocks * |args|.
_MAX_MOD_GRAD_ELEMENTS = 1 << 26


@functools.cache
def flash_kernels():
    """The ``pallas_kernels.flash`` module, imported on the first call."""
    from pallas_kernels import flash

    # The kernel's block classes use the same codes as jaxattn.masks.
    assert (flash.EMPTY, flash.PARTIAL, flash.FULL) == (
        masks_lib.EMPTY, masks_lib.PARTIAL, masks_lib.FULL)
    return flash


def _block(length: int, cap: int = DEFAULT_BLOCK) -> int:
    """Tile size for ``length``: ``cap``, or the next power of two (>= 16) for short inputs."""
    return int(min(cap, max(16, 1 << max(0, (length - 1).bit_length()))))


def flash_config_for(call: AttentionCall, block_q: int | None = None,
                     block_kv: int | None = None) -> FlashConfig:
    """The kernel config used for ``call`` (block sizes: the arguments, else the call's
    ``Implementation`` tile sizes, else :func:`_block`)."""
    flash = flash_kernels()
    block_q, block_kv = block_q or call.block_q, block_kv or call.block_kv
    d = call.shape
    backend = flash.default_backend(call.platform)
    if backend == "triton":
        # Hopper: the Mosaic-GPU forward (128 x 64 tiles: two consumer warpgroups) when it can
        # run the call; otherwise (segment ids, sinks, f32, other tiles) the Triton lowering.
        mosaic = flash.FlashConfig(
            block_q=block_q or (64 if d["T"] <= 64 else 128), block_kv=block_kv or 64,
            scale=float(call.scale), logits_soft_cap=call.logits_soft_cap, backend="mosaic_gpu",
            dropout_rate=call.dropout_rate)
        plain = call.bias is None and call.score_mod is None  # Mosaic-GPU has neither
        if plain and flash.mosaic_gpu_refusal(call.query, call.value,
                                              has_segments=call.q_segment_ids is not None,
                                              has_sinks=call.sinks is not None,
                                              config=mosaic) is None:
            return mosaic
    return flash.FlashConfig(
        block_q=block_q or _block(d["T"]), block_kv=block_kv or _block(d["S"]),
        scale=float(call.scale), logits_soft_cap=call.logits_soft_cap, backend=backend,
        dropout_rate=call.dropout_rate,
    )


@functools.lru_cache(maxsize=64)
def _meta_cached(mask, q_len: int, kv_len: int, bq: int, bk: int) -> BlockSparseMeta:
    flash = flash_kernels()
    if mask is None:
        return flash.dense_meta(q_len, kv_len, bq, bk)
    info = mask.block_info(q_len, kv_len, bq, bk)
    return flash.block_sparse_meta(info.kind, info.partial_index, info.partial_blocks)


def meta_for(mask: masks_lib.Mask | None, q_len: int, kv_len: int, block_q: int,
             block_kv: int) -> BlockSparseMeta:
    """Kernel visit lists for a static mask (``None`` = no mask) on a ``block_q x block_kv``
    grid. Padded key columns are masked through the partial tiles."""
    return _meta_cached(None if mask is None else mask.static(), int(q_len), int(kv_len),
                        int(block_q), int(block_kv))


def supports(call: AttentionCall) -> str | None:
    """``None`` if the Pallas kernel can run ``call``, else the reason it cannot."""
    if isinstance(call.scale, jax.core.Tracer):
        return "scale must be a Python number (it is a static kernel parameter)"
    if call.dropout_index is not None:
        return ("dropout of a shard (dropout_index) is not wired into the kernel's hash yet; "
                "use xla_chunked")
    if call.dtype not in _DTYPES:
        return f"dtype {call.dtype} is not one of float32, bfloat16, float16"
    if call.mask is not None and not call.mask.is_static:
        return ("the mask holds traced arrays, so its block structure is unknown at trace time; "
                "pass packed documents as query/kv segment ids (the kernel reads them as arrays)")
    if call.platform not in ("cpu", "gpu", "tpu"):
        return f"no Pallas lowering for platform {call.platform!r}"
    d = call.shape
    if call.platform != "cpu" and (d["H"] not in _HW_HEAD_DIMS or d["Hv"] not in _HW_HEAD_DIMS):
        return (f"on {call.platform} the kernel needs head dims in {_HW_HEAD_DIMS}, "
                f"got H={d['H']}, Hv={d['Hv']}")
    if call.score_mod_args:
        why = _score_mod_args_refusal(call)
        if why is not None:
            return why
    if call.platform == "tpu":
        return _tpu_limits(call)
    return None


def _score_mod_args_refusal(call: AttentionCall) -> str | None:
    """Why the kernels cannot take ``call.score_mod_args`` (None if they can)."""
    if call.platform != "cpu":
        # Checked from CPU: ALiBi's slopes[h] (a dynamic slice of an array value) does not lower
        # for Triton or Mosaic TPU; a score_mod without arguments (soft-cap, index-only) does.
        return (f"on {call.platform} the kernels cannot index score_mod_args (the Triton / "
                "Mosaic lowerings have no dynamic slice or gather of an array value, as "
                "slopes[h] or a table lookup need); use xla_chunked, or a score_mod without "
                "arguments")
    d = call.shape
    nq = -(-d["T"] // flash_config_for(call).block_q)
    size = sum(int(jnp.size(a)) for a in call.score_mod_args
               if jnp.issubdtype(jnp.result_type(a), jnp.floating))
    total = d["B"] * d["N"] * nq * size
    if total > _MAX_MOD_GRAD_ELEMENTS:
        return (f"the dq kernel's partial gradients of score_mod_args (B*N*num_q_blocks*"
                f"{size} = {total} f32) exceed {_MAX_MOD_GRAD_ELEMENTS}; use xla_chunked")
    return None


# The TPU variant keeps the visit lists in SMEM and one (batch, kv head)'s K and V whole in VMEM
# (double-buffered); refuse calls that cannot fit rather than fail in the compiler.
_TPU_SMEM_BYTES = 512 << 10
_TPU_VMEM_BYTES = 32 << 20


def _tpu_limits(call: AttentionCall) -> str | None:
    d = call.shape
    cfg = flash_config_for(call)
    nq, nk = -(-d["T"] // cfg.block_q), -(-d["S"] // cfg.block_kv)
    mask = call.mask
    rows = (mask.batch_size or 1) * (mask.num_heads or 1) if mask is not None else 1
    smem = 4 * rows * max(nq * (2 + 3 * nk), nk * (2 + 3 * nq))
    if smem > _TPU_SMEM_BYTES:
        return (f"TPU: block metadata needs {smem >> 10} KiB of SMEM (> {_TPU_SMEM_BYTES >> 10}"
                " KiB); shorter sequences or a batch/head-independent mask are needed")
    kv = 2 * cfg.block_kv * nk * (d["H"] + d["Hv"]) * call.value.dtype.itemsize
    if kv > _TPU_VMEM_BYTES:
        return (f"TPU: this kernel keeps K and V of one kv head in VMEM ({kv >> 20} MiB > "
                f"{_TPU_VMEM_BYTES >> 20} MiB); S={d['S']} is too long for it")
    return None


def prefer(call: AttentionCall) -> str | None:
    """Automatic selection: never on CPU (interpreter), and not on GPU/TPU until validated."""
    if call.platform == "cpu":
        return "on CPU the Pallas kernel runs in the (slow) interpreter; for tests and debugging"
    if not HARDWARE_VALIDATED:
        return (f"the {call.platform} lowering has not been validated on a device yet; pass "
                "implementation='pallas' to opt in")
    return None


def run(call: AttentionCall, block_q: int | None = None, block_kv: int | None = None):
    """Run ``call`` with the Pallas kernel; returns ``(out [B, T, N, Hv], lse [B, T, N])``."""
    why = supports(call)
    if why is not None:
        raise ValueError(f"pallas cannot run this call: {why}")
    cfg = flash_config_for(call, block_q, block_kv)
    d = call.shape
    meta = meta_for(call.mask, d["T"], d["S"], cfg.block_q, cfg.block_kv)
    seg_q, seg_kv = call.q_segment_ids, call.kv_segment_ids
    if seg_q is not None:
        seg_q, seg_kv = seg_q.astype(jnp.int32), seg_kv.astype(jnp.int32)
    seed = None
    if call.dropout_rate > 0:  # the reference's position-hash mask: same entries dropped
        seed = dropout_lib.dropout_seed(call.dropout_rng)
    out, lse, _ = flash_kernels().flash_attention(
        call.query, call.key, call.value, meta, config=cfg, q_segment_ids=seg_q,
        kv_segment_ids=seg_kv, sinks=call.sinks, dropout_seed=seed, bias=call.bias,
        score_mod=call.score_mod, score_mod_args=call.score_mod_args,
    )
    return out, lse


BACKEND = registry.Backend("pallas", run, supports=supports, prefer=prefer, priority=20,
                           tiled=True)
