"""ConvNN: convolutional nearest-neighbour layers for PyTorch."""

from convnn import functional
from convnn.attention import (
    Conv1d_NN_Attn,
    Conv1dNNAttention,
    Conv2d_NN_Attn,
    Conv2dNNAttention,
    ConvNNAttention,
)
from convnn.branching import Branching, BranchingMixer
from convnn.checkpoints import from_convnn_attention_state_dict
from convnn.continuous import CKConv2d, FlexConv2d, from_ccnn_state_dict
from convnn.graph import Grapher, GrapherConv2d, GrapherMixer
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
from convnn.mixers import (
    Attention2d,
    Conv1dMixer,
    Conv1dNNMixer,
    KNNAttention,
    LocalAttention,
    MultiHeadAttention,
    SparseAttention,
)
from convnn.recording import NeighborRecord, record_neighbors
from convnn.registry import (
    LAYERS,
    SAMPLING_KEYWORDS,
    Conv2dSame,
    LayerSpec,
    constructor_keywords,
    layer_options,
)
from convnn.sampling import SAMPLING_TYPES, CandidateSampler
from convnn.shuffle import PixelShuffle1d, PixelUnshuffle1d, pixel_shuffle_1d, pixel_unshuffle_1d

__version__ = "0.1.0"

__all__ = [
    "AGGREGATION_TYPES",
    "LAYERS",
    "SAMPLING_KEYWORDS",
    "SAMPLING_TYPES",
    "SHUFFLE_PATTERNS",
    "SIMILARITY_TYPES",
    "Attention2d",
    "Branching",
    "BranchingMixer",
    "CKConv2d",
    "CandidateSampler",
    "Conv1dMixer",
    "Conv1dNN",
    "Conv1dNNAttention",
    "Conv1dNNMixer",
    "Conv1d_NN",
    "Conv1d_NN_Attn",
    "Conv2dNN",
    "Conv2dNNAttention",
    "Conv2dSame",
    "Conv2d_NN",
    "Conv2d_NN_Attn",
    "ConvNNAttention",
    "ConvNNBase",
    "FlexConv2d",
    "Grapher",
    "GrapherConv2d",
    "GrapherMixer",
    "KNNAttention",
    "LayerSpec",
    "LocalAttention",
    "MultiHeadAttention",
    "NeighborRecord",
    "PixelShuffle1d",
    "PixelUnshuffle1d",
    "SparseAttention",
    "TokenMap",
    "__version__",
    "constructor_keywords",
    "from_ccnn_state_dict",
    "from_convnn_attention_state_dict",
    "functional",
    "layer_options",
    "pixel_shuffle_1d",
    "pixel_unshuffle_1d",
    "record_neighbors",
]
