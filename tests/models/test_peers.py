"""The kNN peers as networks: isotropic ViG against the original's layout, and the
patch-dictionary network against the paper's definitions (the original computes the k nearest
dictionary entries as a convolution: 0.5‖c‖² − ⟨xW, c⟩, then ``kthvalue``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.module import ImageClassifier
from models.patch_knn import PatchKNN, kmeans, whitening_matrix
from models.vig import ViG
from tests.convnn.test_graph import RefGrapher, _randomise, ref_act


# ----------------------------------------------------------------------------------- ViG
class RefFFN(nn.Module):
    def __init__(self, c, hidden, act):
        super().__init__()
        self.fc1 = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.BatchNorm2d(hidden))
        self.act = ref_act(act)
        self.fc2 = nn.Sequential(nn.Conv2d(hidden, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) + x


class RefDeepGCN(nn.Module):
    """The original DeepGCN with a 2-conv stem (stride 4), written as its vig.py does."""

    def __init__(self, c, k, n_blocks, classes, act="gelu", conv="mr", tokens=16):
        super().__init__()
        self.stem = SimpleNamespace()
        self.stem = nn.Module()
        self.stem.convs = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, 2, 1), nn.BatchNorm2d(c // 2), ref_act(act),
            nn.Conv2d(c // 2, c, 3, 2, 1), nn.BatchNorm2d(c), ref_act(act),
            nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c),
        )  # fmt: skip
        num_knn = [int(x.item()) for x in torch.linspace(k, 2 * k, n_blocks)]
        max_dilation = tokens // max(num_knn)
        self.pos_embed = nn.Parameter(torch.zeros(1, c, 4, 4))
        self.backbone = nn.Sequential(*[
            nn.Sequential(
                RefGrapher(c, num_knn[i], min(i // 4 + 1, max_dilation), conv, act, "batch",
                           True, 1, n=tokens),
                RefFFN(c, c * 4, act),
            )
            for i in range(n_blocks)
        ])  # fmt: skip
        self.prediction = nn.Sequential(
            nn.Conv2d(c, 1024, 1), nn.BatchNorm2d(1024), ref_act(act), nn.Dropout(0.0),
            nn.Conv2d(1024, classes, 1),
        )  # fmt: skip

    def forward(self, x):
        x = self.stem.convs(x) + self.pos_embed
        x = self.backbone(x)
        return self.prediction(F.adaptive_avg_pool2d(x, 1)).squeeze(-1).squeeze(-1)


def test_vig_has_the_original_layout_and_output():
    """Catches: renamed stem/backbone/prediction keys, the k schedule or the dilation rule."""
    torch.manual_seed(0)
    ref = RefDeepGCN(8, 2, 5, 3)
    _randomise(ref, 3)
    ours = ViG(None, 3, 3, 16, dim=8, depth=5, k=2, stem_stride=4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert [b[0].graph_conv.d for b in ours.backbone] == [1, 1, 1, 1, 2]
    assert [b[0].graph_conv.k for b in ours.backbone] == [2, 2, 3, 3, 4]
    ref.eval(), ours.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_vig_refuses_a_token_grid_smaller_than_the_neighbours():
    with pytest.raises(ValueError, match=r"k=9 grows to 18 neighbours but the 2×2 token grid"):
        ViG(None, 3, 10, 32, stem_stride=16)
    with pytest.raises(ValueError, match="stem_stride=3 must be a power of two"):
        ViG(None, 3, 10, 32, stem_stride=3)


# ------------------------------------------------------------------------------ PatchKNN
def _fitted(embedding: str = "hard", whitening: str = "pca", **kw) -> PatchKNN:
    torch.manual_seed(0)
    net = PatchKNN(None, 2, 5, 9, embedding=embedding, k=3, n_clusters=12, n_patches=400,
                   patch_size=3, whitening=whitening, pool_size=2, pool_stride=2, bottleneck=4,
                   kmeans_iters=5, **kw)  # fmt: skip
    x = torch.randn(30, 2, 9, 9)
    net.load_data_stage(net.data_stage([(x[i : i + 7], None) for i in range(0, 30, 7)], 30,
                                       progress=False))  # fmt: skip
    return net


def ref_embedding(net: PatchKNN, x: torch.Tensor, full: bool) -> torch.Tensor:
    """The original KNearestPatchesEmbedding: conv with kernel −(C Wᵀ), bias ½‖C‖², the k-th
    smallest per location, mask = distances ≤ it; Φ_full multiplies by the learned conv."""
    c = net.centroids.double()
    kernel = -(c @ net.whitening.double().t()).reshape(-1, 2, 3, 3)
    bias = 0.5 * c.norm(dim=1) ** 2
    distances = F.conv2d(x.double(), kernel, bias)
    values, _ = distances.kthvalue(k=net.k, dim=1, keepdim=True)
    mask = torch.le(distances, values).float()
    return mask * net.conv(x) if full else mask


@pytest.mark.parametrize(
    ("embedding", "whitening"),
    [("hard", "pca"), ("full", "pca"), ("full", "zca"), ("full", "none")],
)
def test_patch_embedding_matches_the_papers_definition(embedding, whitening):
    """Catches: unwhitened queries, a transposed whitening, a wrong patch order or mask layout."""
    net = _fitted(embedding, whitening)
    x = torch.randn(3, 2, 9, 9)
    ours = net.embed(x)
    assert ours.shape == (3, 12, 7, 7)
    assert torch.all(ours.ne(0).sum(1) <= 3)
    torch.testing.assert_close(ours, ref_embedding(net, x, embedding == "full"))


def test_whitening_matrices():
    """Catches: PCA/ZCA swapped, eigenvalues not square-rooted."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(5000, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, 4, generator=g, dtype=torch.float64
    )
    cov = torch.cov(data.t(), correction=0)
    for kind in ("pca", "zca"):
        w = whitening_matrix(cov, kind, 0.0).double()
        white = (data - data.mean(0)) @ w
        torch.testing.assert_close(torch.cov(white.t(), correction=0), torch.eye(4, dtype=w.dtype),
                                   atol=1e-4, rtol=0)  # fmt: skip
    zca = whitening_matrix(cov, "zca", 0.0)
    torch.testing.assert_close(zca, zca.t(), atol=1e-5, rtol=0)


def test_kmeans_recovers_separated_clusters():
    """Catches: a broken assignment or update step of the torch k-means."""
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centres.repeat(50, 1) + 0.1 * torch.randn(150, 2, generator=g)
    found = kmeans(points, 3, iters=10, seed=0, backend="torch")
    dist = torch.cdist(found, centres)
    assert torch.all(dist.min(dim=1).values < 0.2)
    assert sorted(dist.argmin(dim=1).tolist()) == [0, 1, 2]
    assert torch.equal(found, kmeans(points, 3, iters=10, seed=0, backend="torch"))


def test_kmeans_through_faiss_when_installed():
    """Catches: a faiss call with the wrong layout or dtype (the optional extra)."""
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centres.repeat(50, 1) + 0.1 * torch.randn(150, 2, generator=g)
    found = kmeans(points, 3, iters=10, seed=0, backend="faiss")
    assert found.shape == (3, 2) and found.dtype == points.dtype
    label = torch.cdist(points, found).argmin(dim=1)  # a k-means fixed point: centroid = mean
    for j in label.unique():
        torch.testing.assert_close(found[j], points[label == j].mean(0), atol=1e-4, rtol=0)


def test_dictionary_stage_is_seeded_and_stored_in_the_state_dict():
    """Catches: an unseeded sample, a dictionary outside the checkpoint, a recomputation."""
    a, b = _fitted(), _fitted()
    torch.testing.assert_close(a.centroids, b.centroids)
    assert not a.needs_data_stage
    state = a.state_dict()
    assert {"centroids", "whitening", "fitted"} <= set(state)
    torch.manual_seed(5)
    fresh = PatchKNN(None, 2, 5, 9, embedding="hard", k=3, n_clusters=12, n_patches=400,
                     patch_size=3, pool_size=2, pool_stride=2, bottleneck=4)  # fmt: skip
    assert fresh.needs_data_stage
    fresh.load_state_dict(state)
    assert not fresh.needs_data_stage
    x = torch.randn(2, 2, 9, 9)
    torch.testing.assert_close(fresh.eval()(x), a.eval()(x))


def test_module_runs_the_data_stage_once_on_rank_zero():
    """Catches: the hook skipped, run on every rank, or not broadcast."""
    net = PatchKNN(None, 2, 5, 9, embedding="hard", k=3, n_clusters=12, n_patches=400,
                   patch_size=3, pool_size=2, pool_stride=2, bottleneck=4)  # fmt: skip
    x = torch.randn(20, 2, 9, 9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(20)), 8)
    broadcasts = []

    def broadcast(obj, src=0):
        broadcasts.append(obj)
        return obj

    trainer = SimpleNamespace(
        is_global_zero=True,
        progress_bar_callback=None,
        datamodule=SimpleNamespace(unaugmented_train_dataloader=lambda: loader),
        strategy=SimpleNamespace(broadcast=broadcast),
    )
    module = ImageClassifier(net, 5, optimizer=torch.optim.SGD)
    module.trainer = trainer  # type: ignore[assignment]
    module.on_fit_start()
    assert len(broadcasts) == 1 and not net.needs_data_stage
    torch.testing.assert_close(net.centroids, broadcasts[0]["centroids"])
    module.on_fit_start()  # already fitted (a resume): nothing recomputed
    assert len(broadcasts) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 20, "n_clusters": 16}, "k=20 nearest entries need a dictionary of at least k"),
        ({"n_clusters": 64, "n_patches": 32, "k": 4}, "n_clusters=64 centroids need at least"),
        ({"whitening": "pcaa"}, "whitening='pcaa' is not supported"),
        ({"embedding": "soft"}, "embedding='soft' is not supported"),
        ({"patch_size": 11}, "patch_size=11 does not fit image_size=9"),
    ],
)
def test_patch_knn_rejects_bad_options(kwargs, message):
    kwargs = {"k": 4, "n_clusters": 16, "n_patches": 64, **kwargs}
    with pytest.raises(ValueError, match=message):
        PatchKNN(None, 2, 5, 9, **kwargs)


def test_dictionary_stage_refuses_too_few_patches():
    """n_patches ≥ n_clusters, but the split holds fewer usable patches than n_clusters."""
    net = PatchKNN(None, 1, 2, 4, embedding="hard", k=2, n_clusters=40, n_patches=100,
                   patch_size=3, pool_size=0, bottleneck=0)  # fmt: skip
    x = torch.randn(5, 1, 4, 4)  # 5 images × 4 patches
    with pytest.raises(ValueError, match="n_clusters=40 exceeds the 20 usable patches"):
        net.data_stage([(x, None)], 5, progress=False)
