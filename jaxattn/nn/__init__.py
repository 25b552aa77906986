"""Flax NNX layers: thin shells that own parameters and call jaxattn's pure functions.

Every token mixer registers itself in :data:`MIXERS` when its module is imported (all of them
are, here); :func:`make_mixer` builds one by name (see :mod:`jaxattn.nn.mixer`).
"""

from jaxattn.nn import (  # noqa: F401  (register mixers)
    bam,
    baseconv,
    based,
    combiner,
    moa,
    moh,
    routing,
    sigmoid_lookup,
    tensor_attention,
    uoe,
)
from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.nn.baseconv import BaseConv
from jaxattn.nn.based import BasedLinearAttention
from jaxattn.nn.mixer import (
    MIXERS,
    PATTERNS,
    AuxLoss,
    MixerSpec,
    TokenMixer,
    aux_losses,
    capture_aux_losses,
    make_mixer,
    register_mixer,
    sow_aux_loss,
    total_aux_loss,
)
from jaxattn.nn.moh import MoHAttention
from jaxattn.nn.neighborhood import (
    NeighborhoodAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
    NeighborhoodMixer,
)
from jaxattn.nn.random_features import FrozenWeight, RandomFeatureAttention
from jaxattn.nn.rope import apply_rope
from jaxattn.nn.sigmoid_lookup import SigmoidLookupAttention
from jaxattn.nn.tensor_attention import TensorAttention

__all__ = [
    "MIXERS",
    "PATTERNS",
    "AuxLoss",
    "BaseConv",
    "BasedLinearAttention",
    "FrozenWeight",
    "MixerSpec",
    "MoHAttention",
    "MultiHeadAttention",
    "NeighborhoodAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "NeighborhoodMixer",
    "RandomFeatureAttention",
    "SigmoidLookupAttention",
    "TensorAttention",
    "TokenMixer",
    "apply_rope",
    "aux_losses",
    "capture_aux_losses",
    "make_mixer",
    "register_mixer",
    "sow_aux_loss",
    "total_aux_loss",
]
