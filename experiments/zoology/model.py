"""The 2-layer MQAR harness of Zoology: token embedding (N(0, 0.02)) tied with the output
head, learned absolute positions only for the attention model, pre-norm blocks
``x = x + mixer(LN(x))`` with no MLP (the figure-2 configuration uses an identity state mixer),
and a final LayerNorm."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.zoology.mixers import make_mixer

__all__ = ["MODELS", "MQARModel", "ZoologyModelConfig"]

# model name -> (mixer of layer 0, mixer of layer 1, learned position embeddings?)
MODELS: dict[str, tuple[tuple[str, ...], bool]] = {
    "attention": (("attention", "attention"), True),
    # BaseConv with kernel sizes [3, -1]: a short conv, then the implicit long conv.
    "baseconv": (("baseconv_short", "baseconv_long"), False),
    # Based = Hybrid alternating BaseConv (k = 3) and Based linear attention by layer index.
    "based": (("baseconv_short", "based"), False),
    # BaseConv interleaved with one input-dependent sparse-attention layer.
    "sparse": (("baseconv_short", "sparse"), False),
    # Based linear attention alone (not in the figure; for comparison).
    "based_only": (("based", "based"), False),
}


@dataclasses.dataclass(frozen=True)
class ZoologyModelConfig:
    name: str = "attention"  # a key of MODELS
    width: int = 64
    vocab_size: int = 8192
    seq_len: int = 64
    dropout: float = 0.0  # the paper uses 0.1 (embeddings and attention probabilities)
    rope_theta: float | None = None  # RoPE in the attention mixer (not in the paper)
    # std of the q/k/v kernels of the softmax attentions (the attention model and the sparse
    # hybrid's lookups); None: the reference's N(0, 0.02). The quick preset sets 0.1.
    attn_init_std: float | None = None


class MQARModel(nnx.Module):
    """``tokens int32 [B, L]`` -> ``(hidden [B, L, D], aux_loss)``; ``logits(h)`` applies the
    tied head. Layers are named by :data:`MODELS`."""

    def __init__(self, cfg: ZoologyModelConfig, *, rngs: nnx.Rngs):
        if cfg.name not in MODELS:
            raise ValueError(f"unknown model {cfg.name!r}; choose from {sorted(MODELS)}")
        layers, use_pos = MODELS[cfg.name]
        d = cfg.width
        self.embed = nnx.Embed(cfg.vocab_size, d, embedding_init=nnx.initializers.normal(0.02),
                               rngs=rngs)
        self.pos = nnx.Embed(cfg.seq_len, d, embedding_init=nnx.initializers.normal(0.02),
                             rngs=rngs) if use_pos else None
        self.norms = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in layers])
        self.mixers = nnx.List([
            make_mixer(name, d, cfg.seq_len, n_layers=len(layers), dropout=cfg.dropout,
                       rope_theta=cfg.rope_theta, attn_init_std=cfg.attn_init_std,
                       rngs=rngs)
            for name in layers
        ])
        self.final_norm = nnx.LayerNorm(d, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.seq_len = cfg.seq_len

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        x = self.embed(tokens)  # [B, L, D]
        if self.pos is not None:
            if tokens.shape[1] > self.seq_len:
                raise ValueError(f"sequence length {tokens.shape[1]} exceeds {self.seq_len}")
            x = x + self.pos(jnp.arange(tokens.shape[1]))[None].astype(x.dtype)
        if self.dropout is not None:
            x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        aux = jnp.zeros((), jnp.float32)
        for norm, mixer in zip(self.norms, self.mixers, strict=True):
            y, a = mixer(norm(x), deterministic=deterministic, rngs=rngs)
            x, aux = x + y, aux + a
        return self.final_norm(x), aux

    def logits(self, h: jax.Array) -> jax.Array:
        """Tied output head: ``h [..., D] -> [..., V]`` in float32."""
        return jnp.einsum("...d,vd->...v", h.astype(jnp.float32),
                          self.embed.embedding[...].astype(jnp.float32))
