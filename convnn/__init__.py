"""ConvNN: convolutional nearest-neighbour layers for PyTorch."""

from convnn import functional
from convnn.attention import (
    Conv1d_NN_Attn,
    Conv1dNNAttention,
    Conv2d_NN_Attn,
    Conv2dNNAttention,
    ConvNNAttention,
)
from convnn.branching import Branching
from convnn.layers import (
    AGGREGATION_TYPES,
    SHUFFLE_PATTERNS,
    SIMILARITY_TYPES,
    Conv1d_NN,
    Conv1dNN,
    Conv2d_NN,
    Conv2dNN,
    ConvNNBase,
    TokenMap,
)
from convnn.sampling import SAMPLING_TYPES, CandidateSampler
from convnn.shuffle import PixelShuffle1d, PixelUnshuffle1d, pixel_shuffle_1d, pixel_unshuffle_1d

__version__ = "0.1.0"

__all__ = [
    "AGGREGATION_TYPES",
    "SAMPLING_TYPES",
    "SHUFFLE_PATTERNS",
    "SIMILARITY_TYPES",
    "Branching",
    "CandidateSampler",
    "Conv1dNN",
    "Conv1dNNAttention",
    "Conv1d_NN",
    "Conv1d_NN_Attn",
    "Conv2dNN",
    "Conv2dNNAttention",
    "Conv2d_NN",
    "Conv2d_NN_Attn",
    "ConvNNAttention",
    "ConvNNBase",
    "PixelShuffle1d",
    "PixelUnshuffle1d",
    "TokenMap",
    "__version__",
    "functional",
    "pixel_shuffle_1d",
    "pixel_unshuffle_1d",
]
