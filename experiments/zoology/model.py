"""The 2-layer MQAR harness of Zoology as a :class:`jaxattn.models.DecoderLM` config: token
embedding (N(0, 0.02)) tied with the output head, learned absolute positions only for the
attention model, pre-norm blocks ``x = x + mixer(LN1(x))`` with no MLP (the figure-2
configuration uses an identity state mixer), and a final LayerNorm. The mixers are
``jaxattn.nn``'s registered ``attention``, ``baseconv``, ``based`` and ``sigmoid_lookup``.

The reference's ``TransformerBlock`` returns ``(state_mixer(LN2(residual)), residual)`` and the
next block (or the final norm) adds that output back into the residual; with the identity state
mixer every block therefore ends with ``x = x + LN2(x)`` (learned scale and bias).
``model.state_norm = True`` (the default) keeps that term; ``False`` drops it (the previous
harness)."""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from jaxattn.models import DecoderLM, LMConfig, MixerConfig

__all__ = ["LAYERS", "MODELS", "ZoologyModelConfig", "build_model", "layer_config", "lm_config"]

_STD = 0.02  # the reference initialises every Linear and Embedding with N(0, 0.02)

# layer kind -> registered mixer and its fixed options
LAYERS: dict[str, MixerConfig] = {
    "attention": MixerConfig("attention"),
    "baseconv_short": MixerConfig("baseconv", (("kernel_size", 3),)),
    "baseconv_long": MixerConfig("baseconv", (("kernel_size", -1),)),
    "based": MixerConfig("based", (("feature_dim", 8),)),
    "based_linear": MixerConfig("based", (("feature_dim", 8), ("view", "linear"))),
    "sparse": MixerConfig("sigmoid_lookup"),
}

# model name -> (layer kinds, learned position embeddings?)
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
    # the reference's identity state mixer: ``x = x + LN2(x)`` after every mixer (see the
    # module docstring); False: ``x = x + mixer(LN1(x))`` only
    state_norm: bool = True


def layer_config(kind: str, cfg: ZoologyModelConfig, n_layers: int) -> MixerConfig:
    """The mixer of one layer with the harness's init: output kernels ``0.02 / sqrt(2 n)``."""
    out_std = _STD / math.sqrt(2 * n_layers)
    qkv_std = _STD if cfg.attn_init_std is None else cfg.attn_init_std
    m = LAYERS[kind]
    if m.name == "attention":
        return m.with_options(init_std=qkv_std, out_init_std=out_std, dropout_rate=cfg.dropout,
                              rope_theta=cfg.rope_theta)
    if m.name == "baseconv":
        return m.with_options(max_length=cfg.seq_len)
    if m.name == "based":
        return m.with_options(out_std=out_std)
    return m.with_options(init_std=qkv_std, out_std=out_std, dropout=cfg.dropout)


def lm_config(cfg: ZoologyModelConfig) -> LMConfig:
    """The :class:`LMConfig` of a Zoology model."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; choose from {sorted(MODELS)}")
    kinds, use_pos = MODELS[cfg.name]
    return LMConfig(
        vocab_size=cfg.vocab_size, width=cfg.width, max_length=cfg.seq_len, num_heads=1,
        mixers=tuple(layer_config(k, cfg, len(kinds)) for k in kinds), mlp_ratio=0,
        learned_positions=use_pos, tie_embeddings=True, embed_init_std=_STD,
        dropout=cfg.dropout)


class _IdentityStateMixer(nnx.Module):
    """The reference's ``torch.nn.Identity`` state mixer: ``x [B, L, D] -> x``."""

    def __call__(self, x):
        return x


def build_model(cfg: ZoologyModelConfig, *, rngs: nnx.Rngs) -> DecoderLM:
    """``tokens int32 [B, L]`` -> ``hidden [B, L, D]``; ``model.logits(h)`` is the tied head.

    With ``cfg.state_norm`` the DecoderLM's MLP slot (``x = x + mlp(mlp_norm(x))``) holds the
    identity, which is the reference's ``x = x + LN2(x)``; its norms are built after every
    other parameter, so the other parameters equal those of ``state_norm=False``."""
    model = DecoderLM(lm_config(cfg), rngs=rngs)
    if cfg.state_norm:
        n = len(model.mixers)
        model.mlp_norms = nnx.List([nnx.LayerNorm(cfg.width, rngs=rngs) for _ in range(n)])
        model.mlps = nnx.List([_IdentityStateMixer() for _ in range(n)])
    return model
