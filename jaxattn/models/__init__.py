"""Reusable backbones that take a registered token mixer per layer, so a paper's model is a
config: a decoder-only LM, a parallel-block LM with MoE upcycling, a ViT encoder with a
classifier head, a hierarchical (NAT-style) vision backbone."""

from jaxattn.models.encoder import ViTClassifier, ViTConfig, patchify
from jaxattn.models.hierarchical import HierarchicalClassifier, HierarchicalConfig, nat_config
from jaxattn.models.layers import MLP, MixerConfig, build_mixer
from jaxattn.models.lm import DecoderLM, LMConfig
from jaxattn.models.parallel_lm import ParallelLM, ParallelLMConfig, upcycle

__all__ = [
    "DecoderLM",
    "HierarchicalClassifier",
    "HierarchicalConfig",
    "LMConfig",
    "MLP",
    "MixerConfig",
    "ParallelLM",
    "ParallelLMConfig",
    "ViTClassifier",
    "ViTConfig",
    "build_mixer",
    "nat_config",
    "patchify",
    "upcycle",
]
