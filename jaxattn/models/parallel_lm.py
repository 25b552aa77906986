"""A decoder-only LM with *parallel* blocks, and BAM / BTX upcycling of such dense models.

Block (GPT-J / PaLM style, the block BAM's seeds use): ``h = LN(x); x = x + mixer(h) + FFN(h)``,
one LayerNorm feeding both. The mixer is a registered token mixer (``MixerConfig`` per layer, as
:class:`jaxattn.models.DecoderLM`); the FFN is the dense :class:`jaxattn.models.MLP`
(``ffn_experts = 0``) or :class:`jaxattn.nn.bam.MoEFeedForward` (``ffn_experts = E``, top-k
routed). Tokens ``[B, L]`` -> embeddings + learned positions -> blocks -> final LayerNorm ->
hidden ``[B, L, D]``; :meth:`ParallelLM.logits` is the tied output head.

:func:`upcycle` mixes ``E`` dense ``ParallelLM`` s into one MoE (Zhang et al., "BAM! Just Like
That", NeurIPS 2024, §3): FFN experts = the parents' MLPs (top-1), attention = BAM's soft-routed
experts (``"expert_kv"`` / ``"shared_kv"``), the top-k ablation (``attention_top_k``), or BTX's
average of the parents' attention (``"average"``, Sukhbaatar et al. 2024); every other parameter
(embeddings, positions, LayerNorms) is the uniform average of the parents; routers random.

Why a separate backbone: ``DecoderLM`` has sequential blocks ``x + mixer(LN x)`` then
``x + MLP(LN x)``; making this a config of it needs a ``parallel_block: bool`` field (one norm,
one residual sum) and an FFN slot that can hold an MoE FFN (``ffn_experts``, ``ffn_top_k``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import MLP, MixerConfig, build_mixer
from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.nn.bam import BAMAttention, MoEFeedForward

__all__ = ["ParallelLM", "ParallelLMConfig", "average_into", "upcycle"]

ATTENTION_MODES = ("expert_kv", "shared_kv", "average")


@dataclasses.dataclass(frozen=True)
class ParallelLMConfig:
    """Parallel-block LM: one :class:`MixerConfig` per layer; ``ffn_experts = 0`` a dense MLP."""

    vocab_size: int = 256
    width: int = 64
    max_length: int = 256
    num_heads: int = 4
    mixers: tuple[MixerConfig, ...] = (MixerConfig("attention"),) * 2
    mlp_ratio: int = 4
    ffn_experts: int = 0  # 0: dense MLP; E: MoEFeedForward with E experts
    ffn_top_k: int = 1
    balance_weight: float = 0.01  # alpha (not given in the BAM text read; Switch's default)
    z_weight: float = 0.001  # beta (ST-MoE's default)
    router_bias: bool = False
    embed_init_std: float = 0.02


class ParallelLM(nnx.Module):
    """``tokens int32 [B, L]`` -> ``hidden [B, L, D]``; ``logits(hidden) -> [..., V]`` (f32)."""

    def __init__(self, cfg: ParallelLMConfig, *, rngs: nnx.Rngs):
        d = cfg.width
        init = nnx.initializers.normal(cfg.embed_init_std)
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, d, embedding_init=init, rngs=rngs)
        self.pos = nnx.Embed(cfg.max_length, d, embedding_init=init, rngs=rngs)
        self.norms = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in cfg.mixers])
        self.mixers = nnx.List([
            build_mixer(m, features=d, num_heads=cfg.num_heads, causal=True, rngs=rngs)
            for m in cfg.mixers])
        if cfg.ffn_experts:
            self.ffns = nnx.List([
                MoEFeedForward(d, cfg.mlp_ratio * d, experts=cfg.ffn_experts,
                               top_k=cfg.ffn_top_k, balance_weight=cfg.balance_weight,
                               z_weight=cfg.z_weight, router_bias=cfg.router_bias, rngs=rngs)
                for _ in cfg.mixers])
        else:
            self.ffns = nnx.List([MLP(d, cfg.mlp_ratio, rngs=rngs) for _ in cfg.mixers])
        self.final_norm = nnx.LayerNorm(d, rngs=rngs)
        self.max_length = cfg.max_length

    def __call__(self, tokens: jax.Array, *, deterministic: bool | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_length "
                             f"{self.max_length}")
        x = self.embed(tokens)
        x = x + self.pos(jnp.arange(tokens.shape[1]))[None].astype(x.dtype)
        for norm, mixer, ffn in zip(self.norms, self.mixers, self.ffns, strict=True):
            h = norm(x)
            f = ffn(h, deterministic=deterministic) if isinstance(ffn, MoEFeedForward) \
                else ffn(h)
            x = x + mixer(h, deterministic=deterministic, rngs=rngs) + f
        return self.final_norm(x)

    def logits(self, h: jax.Array) -> jax.Array:
        """Tied output head: ``h [..., D] -> [..., V]`` in float32."""
        return jnp.einsum("...d,vd->...v", h.astype(jnp.float32),
                          self.embed.embedding[...].astype(jnp.float32))


def average_into(target: nnx.Module, sources: Sequence[nnx.Module]) -> None:
    """Set ``target``'s parameters to the uniform average of ``sources``' (same structure)."""
    states = [nnx.state(s, nnx.Param) for s in sources]
    nnx.update(target, jax.tree.map(lambda *xs: sum(xs[1:], xs[0]) / len(xs), *states))


def upcycle(dense: Sequence[ParallelLM], *, attention: str = "expert_kv",
            attention_top_k: int | None = None, ffn_top_k: int = 1, fused: bool = False,
            rngs: nnx.Rngs, **config_overrides) -> ParallelLM:
    """Mix ``E = len(dense)`` dense parallel-block LMs into one MoE ``ParallelLM`` (BAM / BTX).

    Args:
      dense: parents with the same config, every mixer plain ``"attention"`` and a dense FFN.
      attention: ``"expert_kv"`` (BAM: expert ``e`` = parent ``e``'s full MHA), ``"shared_kv"``
        (BAM: Q/O per parent, K/V = the parents' average - the paper does not state this init)
        or ``"average"`` (BTX: one attention = the parents' average).
      attention_top_k: ``None`` soft attention routing (BAM) or ``k`` (the top-k ablation).
      ffn_top_k: FFN experts per token (1 in BAM and here for BTX).
      rngs: draws the routers (random init, as the paper).
      config_overrides: other :class:`ParallelLMConfig` fields (``balance_weight``, ...).

    Returns the MoE; FFN experts = the parents' MLPs; embeddings, positions and every LayerNorm
    = the parents' average.
    """
    if not dense:
        raise ValueError("upcycle needs at least one dense model")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    cfg = dense[0].cfg
    if any(m.cfg != cfg for m in dense):
        raise ValueError("every dense model must have the same ParallelLMConfig")
    if cfg.ffn_experts or any(m.name != "attention" for m in cfg.mixers):
        raise ValueError("upcycle needs dense parents: 'attention' mixers and ffn_experts=0")
    e = len(dense)
    moe_cfg = dataclasses.replace(cfg, ffn_experts=e, ffn_top_k=ffn_top_k, **config_overrides)
    if attention == "average":
        if attention_top_k is not None:
            raise ValueError("attention_top_k needs attention='expert_kv' or 'shared_kv'")
    else:
        opts = dict(experts=e, shared_kv=attention == "shared_kv", top_k=attention_top_k,
                    fused=fused, use_bias=dense[0].mixers[0].use_bias,
                    router_bias=moe_cfg.router_bias, balance_weight=moe_cfg.balance_weight,
                    z_weight=moe_cfg.z_weight)
        mixers = tuple(MixerConfig("bam_attention", tuple(opts.items())) for _ in cfg.mixers)
        moe_cfg = dataclasses.replace(moe_cfg, mixers=mixers)
    moe = ParallelLM(moe_cfg, rngs=rngs)
    average_into(moe.embed, [m.embed for m in dense])
    average_into(moe.pos, [m.pos for m in dense])
    average_into(moe.final_norm, [m.final_norm for m in dense])
    for i in range(len(cfg.mixers)):
        average_into(moe.norms[i], [m.norms[i] for m in dense])
        parents = [m.mixers[i] for m in dense]
        if not all(isinstance(p, MultiHeadAttention) for p in parents):
            raise ValueError("dense mixers must be MultiHeadAttention")
        if attention == "average":
            average_into(moe.mixers[i], parents)
        else:
            src = BAMAttention.from_dense(parents, shared_kv=attention == "shared_kv",
                                          top_k=attention_top_k, fused=fused,
                                          rngs=nnx.Rngs(0))
            _copy_experts(moe.mixers[i], src)
        src_ffn = MoEFeedForward.from_dense([m.ffns[i] for m in dense], rngs=nnx.Rngs(0))
        _copy_experts(moe.ffns[i], src_ffn)
    return moe


def _copy_experts(target: nnx.Module, source: nnx.Module) -> None:
    """Copy every parameter but the router from ``source`` into ``target`` (same class)."""
    for name in ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "q_bias", "k_bias", "v_bias",
                 "o_bias", "fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias"):
        src = getattr(source, name, None)
        if src is not None:
            getattr(target, name)[...] = src[...]
