"""convnn.record_neighbors: recorded indices equal a direct knn_search; off means nothing kept."""

from __future__ import annotations

import torch
from torch import nn

import convnn
from convnn import Branching, Conv1dNNMixer, Conv2dNN, ConvNNAttention, record_neighbors
from convnn.functional import knn_search
from convnn.functional.attention import _split_heads


def test_conv2dnn_indices_equal_direct_knn_search() -> None:
    torch.manual_seed(0)
    layer = Conv2dNN(3, 4, K=5, padding=1, magnitude_type="euclidean")
    x = torch.randn(2, 3, 5, 6)
    with record_neighbors(layer) as records:
        layer(x)
    rec = records[""]
    tokens = layer.prepare_tokens(x)
    qpos = tokens.query_positions
    direct = knn_search(
        tokens.search.index_select(1, qpos), tokens.search, 5, "euclidean", query_positions=qpos
    )
    assert rec.indices.shape == (2, 1, 30, 5)
    assert torch.equal(rec.indices[:, 0], direct)
    assert torch.equal(rec.query_positions, qpos)
    assert rec.weights is None
    assert (rec.grid, rec.shape, rec.padding, rec.shuffle_scale) == ((7, 8), (5, 6), 1, 1)
    assert int(rec.is_padding().sum()) == 7 * 8 - 5 * 6
    # the query's own coordinate is where slot 0 (self) points
    xy = rec.coordinates()
    assert torch.equal(xy[rec.indices[0, 0, :, 0]], xy[qpos])
    assert xy[qpos[0]].tolist() == [0, 0] and xy[qpos[-1]].tolist() == [4, 5]


def test_attention_heads_and_weights_are_recorded() -> None:
    torch.manual_seed(0)
    layer = ConvNNAttention(8, K=3, num_heads=2, magnitude_type="matmul")
    x = torch.randn(2, 6, 8)
    with record_neighbors(nn.Sequential(layer)) as records:
        layer(x)
    rec = records["0"]
    assert rec.indices.shape == (2, 2, 6, 3) and rec.weights.shape == (2, 2, 6, 3)
    torch.testing.assert_close(rec.weights.sum(-1), torch.ones(2, 2, 6))
    tokens = layer.prepare_tokens(x.transpose(1, 2))
    q = _split_heads(layer.q_proj(tokens.search), 2)
    k = _split_heads(layer.k_proj(tokens.search), 2)
    direct = knn_search(q, k, 3, "matmul", include_self=False)
    assert torch.equal(rec.indices.reshape(4, 6, 3), direct)
    assert rec.normalized_weights and rec.spatial_dims == 1


def test_paths_of_nested_layers_and_unshuffle_geometry() -> None:
    net = nn.Sequential(
        Branching(2, 8, lambda i, o: Conv2dNN(i, o, K=4), lambda i, o: nn.Conv2d(i, o, 1)),
        Conv2dNN(8, 8, K=3, shuffle_pattern="BA", shuffle_scale=2),
    )
    with record_neighbors(net) as records:
        net(torch.randn(1, 2, 4, 6))
    assert sorted(records) == ["0.first", "1"]
    rec = records["1"]
    assert (rec.shape, rec.shuffle_scale, rec.input_shape) == ((2, 3), 2, (4, 6))
    assert rec.indices.shape == (1, 1, 6, 3)


def test_mixer_layer_is_recorded_and_nothing_is_kept_when_off() -> None:
    mixer = Conv1dNNMixer(4, K=2)
    x = torch.randn(1, 5, 4)
    mixer(x)
    with record_neighbors(mixer) as records:
        pass
    assert records == {}
    with record_neighbors(mixer) as records:
        mixer(x)
        mixer(x)
    assert sorted(records) == ["layer", "layer#1"]
    assert not any(torch.is_tensor(v) for v in vars(mixer.layer).values())
    assert convnn.recording._ACTIVE.get() is None


def test_knn_attention_selection_and_softmax_are_recorded() -> None:
    """KVT records the keys each query kept (as a direct knn_search finds them) and the softmax."""
    from convnn import KNNAttention
    from convnn.functional import knn_search, selected_scores

    torch.manual_seed(0)
    mixer = KNNAttention(8, num_heads=2, K=3).eval()
    x = torch.randn(2, 10, 8)
    with record_neighbors(mixer) as rec:
        out = mixer(x)
    assert torch.equal(out, mixer(x))  # recording does not change the output
    record = rec[""]
    q, k, _ = mixer.qkv(x).reshape(2, 10, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = q.reshape(4, 10, 4), k.reshape(4, 10, 4)
    idx = knn_search(q, k, 3, "matmul", include_self=False)
    assert torch.equal(record.indices, idx.reshape(2, 2, 10, 3))
    gates = selected_scores(q, k, idx, "matmul").softmax(-1).reshape(2, 2, 10, 3)
    assert torch.allclose(record.weights, gates)
