"""A decoder-only language model backbone taking a mixer per layer.

``tokens [B, L]`` -> embeddings (+ learned absolute positions, optional) -> dropout -> layers of
pre-norm blocks ``x = x + mixer(LN(x))`` (``+ MLP(LN(x))`` when ``mlp_ratio > 0``) -> final
LayerNorm -> hidden ``[B, L, D]``; :meth:`DecoderLM.logits` applies the tied (or separate) output
head. Every mixer is built causal unless ``LMConfig.causal`` is False, which makes the same stack
a bidirectional token encoder (e.g. per-token classification of a synthetic task). Zoology's MQAR
harness is this model with no MLP and the embedding tied to the head
(``experiments/zoology/model.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import MLP, MixerConfig, build_mixer

__all__ = ["DecoderLM", "LMConfig"]


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Decoder-only LM: one :class:`MixerConfig` per layer (``mixers``)."""

    vocab_size: int = 256
    width: int = 64
    max_length: int = 256
    num_heads: int = 1
    mixers: tuple[MixerConfig, ...] = (MixerConfig("attention"),) * 2
    mlp_ratio: int = 0  # 0: no MLP sub-block (Zoology's figure-2 models)
    learned_positions: bool = True
    tie_embeddings: bool = True
    embed_init_std: float = 0.02
    dropout: float = 0.0  # on the embeddings
    causal: bool = True  # False: bidirectional mixers (an encoder over tokens)
    # True: position t's input also gets a second embedding of token t - 1 (zeros at t = 0),
    # so one attention layer can match "the token before" (a one-hop induction lookup)
    token_shift: bool = False


class DecoderLM(nnx.Module):
    """``tokens int32 [B, L]`` -> ``hidden [B, L, D]``; ``logits(hidden) -> [..., V]`` (f32)."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        d = cfg.width
        init = nnx.initializers.normal(cfg.embed_init_std)
        self.embed = nnx.Embed(cfg.vocab_size, d, embedding_init=init, rngs=rngs)
        self.pos = (nnx.Embed(cfg.max_length, d, embedding_init=init, rngs=rngs)
                    if cfg.learned_positions else None)
        self.prev_embed = (nnx.Embed(cfg.vocab_size, d, embedding_init=init, rngs=rngs)
                           if cfg.token_shift else None)
        self.norms = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in cfg.mixers])
        self.mixers = nnx.List([
            build_mixer(m, features=d, num_heads=cfg.num_heads, causal=cfg.causal, rngs=rngs)
            for m in cfg.mixers])
        self.mlp_norms = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in cfg.mixers]
                                  if cfg.mlp_ratio else [])
        self.mlps = nnx.List([MLP(d, cfg.mlp_ratio, rngs=rngs) for _ in cfg.mixers]
                             if cfg.mlp_ratio else [])
        self.final_norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = (None if cfg.tie_embeddings
                     else nnx.Linear(d, cfg.vocab_size, use_bias=False, rngs=rngs))
        self.dropout = nnx.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.max_length = cfg.max_length

    def __call__(self, tokens: jax.Array, *, deterministic: bool | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_length "
                             f"{self.max_length}")
        x = self.embed_inputs(tokens)  # [B, L, D]
        if self.dropout is not None:
            x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers, strict=True)):
            x = x + mixer(norm(x), deterministic=deterministic, rngs=rngs)
            if self.mlps:
                x = x + self.mlps[i](self.mlp_norms[i](x))
        return self.final_norm(x)

    def embed_inputs(self, tokens: jax.Array) -> jax.Array:
        """The first layer's input: ``tokens int32 [B, L] -> [B, L, D]``, the token embedding
        plus the learned position (if any) plus, with ``token_shift``, the previous-token
        embedding (zeros at position 0)."""
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(jnp.arange(tokens.shape[1]))[None].astype(x.dtype)
        if self.prev_embed is not None:
            prev = self.prev_embed(tokens[:, :-1]).astype(x.dtype)  # [B, L - 1, D]
            x = x.at[:, 1:].add(prev)
        return x

    def logits(self, h: jax.Array) -> jax.Array:
        """Output head: ``h [..., D] -> [..., V]`` in float32."""
        if self.head is not None:
            return self.head(h).astype(jnp.float32)
        return jnp.einsum("...d,vd->...v", h.astype(jnp.float32),
                          self.embed.embedding[...].astype(jnp.float32))
