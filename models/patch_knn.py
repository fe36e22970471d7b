"""The patch-dictionary kNN network (Brutzkus et al., "Efficient Learning of CNNs using Patch
Based Features"): a data-dependent embedding of every image patch, then a linear network.

Dictionary stage (before supervised training, :meth:`PatchKNN.data_stage`): sample
``n_patches`` patches of the training images, whiten them (PCA, ZCA or none, from the covariance
of all training patches), cluster them with k-means into ``n_clusters`` centroids.

Embedding of a patch x with whitening W: the indicator over the dictionary of the ``k`` nearest
centroids of xW (Φ_hard), or that indicator times a learned per-entry linear function of the
patch — a convolution with one output channel per entry (Φ_full). Then average pooling,
BatchNorm, a 1×1 bottleneck and a linear classifier on the flattened map. The nearest centroids
come from :func:`convnn.functional.knn_search` (exact, ties to the lower index).

The dictionary, the whitening and a ``fitted`` flag are buffers: they are saved in checkpoints
and a resumed or evaluated network never recomputes them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from convnn.functional import knn_search
from models.layer_factory import LayerFactory
from models.registry import register_backbone

__all__ = [
    "DICTIONARIES",
    "EMBEDDINGS",
    "KMEANS_BACKENDS",
    "WHITENINGS",
    "PatchKNN",
    "kmeans",
    "whitening_matrix",
]

log = logging.getLogger(__name__)

EMBEDDINGS: tuple[str, ...] = ("hard", "full")
WHITENINGS: tuple[str, ...] = ("pca", "zca", "none")
DICTIONARIES: tuple[str, ...] = ("kmeans", "gaussian")
MIN_PATCH_NORM = 0.01  # the original drops sampled patches of smaller norm before clustering
OVERSAMPLE = 1.01  # ... after sampling 1% more than asked, to make up for the dropped ones


def whitening_matrix(cov: Tensor, kind: str, eps: float) -> Tensor:
    """(D, D) W with whitened = x @ W: PCA W = U diag(1/(√λ + eps)), ZCA W = PCA · Uᵀ."""
    if kind == "none":
        return torch.eye(cov.shape[0], dtype=torch.float32)
    eigvals, eigvecs = torch.linalg.eigh(cov.double())
    w = eigvecs * (1.0 / (eigvals.clamp_min(0.0).sqrt() + eps)).unsqueeze(0)
    if kind == "zca":
        w = w @ eigvecs.t()
    return w.float()


def _assign(points: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid of every point (exact search, ties to the lower index)."""
    return knn_search(points[None], centroids[None], 1, "euclidean", include_self=False)[0, :, 0]


def _kmeans_plus_plus(points: Tensor, n_clusters: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centre drawn with probability ∝ squared distance to the
    nearest centre so far."""
    n = points.shape[0]
    sq = points.pow(2).sum(1)

    def dist2(i: int) -> Tensor:  # ‖x − x_i‖² for every point, via one matrix-vector product
        return (sq - 2.0 * (points @ points[i]) + sq[i]).clamp_min_(0.0)

    first = int(torch.randint(n, (1,), generator=g))
    centres = [points[first]]
    d2 = dist2(first)
    for _ in range(1, n_clusters):
        cdf = d2.double().cumsum(0)
        u = torch.rand((), generator=g, dtype=torch.float64) * cdf[-1]
        # inverse-CDF draw; all distances 0 (fewer distinct points than clusters): any point
        nxt = int(torch.searchsorted(cdf, u, right=True).clamp_(max=n - 1))
        if cdf[-1] <= 0:
            nxt = int(torch.randint(n, (1,), generator=g))
        centres.append(points[nxt])
        d2 = torch.minimum(d2, dist2(nxt))
    return torch.stack(centres).clone()


KMEANS_BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")


def kmeans(
    points: Tensor,
    n_clusters: int,
    *,
    iters: int = 25,
    seed: int = 0,
    progress: bool = False,
    backend: str = "auto",
) -> Tensor:
    """(n_clusters, D) k-means centroids of (N, D) ``points``: ``faiss`` (``auto``: when
    installed), else Lloyd's algorithm in torch from seeded k-means++ seeding (empty clusters
    restart at random points)."""
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; choose one of {KMEANS_BACKENDS}")
    faiss = None
    if backend != "torch":
        try:
            import faiss  # the optional extra (pip install -e ".[faiss]")
        except ImportError:
            if backend == "faiss":
                raise
    if faiss is not None:
        km = faiss.Kmeans(points.shape[1], n_clusters, niter=iters, seed=seed)
        km.train(points.detach().cpu().float().contiguous().numpy())
        return torch.from_numpy(km.centroids).to(points)
    g = torch.Generator().manual_seed(seed)
    n = points.shape[0]
    centroids = _kmeans_plus_plus(points, n_clusters, g)
    for _ in tqdm(range(iters), desc="k-means", disable=not progress, leave=False):
        label = _assign(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, label, points)
        counts = torch.bincount(label, minlength=n_clusters)
        empty = counts == 0
        centroids = sums / counts.clamp_min(1).unsqueeze(1).to(points.dtype)
        n_empty = int(empty.sum())
        if n_empty:
            centroids[empty] = points[torch.randperm(n, generator=g)[:n_empty]]
    return centroids


@register_backbone
class PatchKNN(nn.Module):
    """Patch-dictionary kNN network; defaults are the paper's CIFAR-10 Φ_full setting.

    Args:
        layer: unused (the embedding is fixed); accepted like every backbone.
        in_channels, num_classes, image_size: data shape.
        embedding: ``full`` (Φ_full: indicator × a learned linear function per entry) or
            ``hard`` (Φ_hard: the indicator of the k nearest entries).
        k: nearest dictionary entries per patch.
        n_clusters: dictionary size.
        n_patches: training patches sampled for whitening and k-means.
        dictionary: ``kmeans`` (clustered training patches) or ``gaussian`` (clustered N(0, I)
            patches: the paper's "random patches" baseline; the whitening then comes from them).
        patch_size, stride, padding: the patch grid (a convolution's).
        whitening: ``pca`` | ``zca`` | ``none``.
        whitening_eps: added to √λ in the whitening.
        pool_size, pool_stride: average pooling of the embedding (``ceil_mode``); 0 = none.
        batch_norm: BatchNorm after the pooling.
        bottleneck: output channels of the 1×1 bottleneck before the classifier; 0 = none.
        kmeans_iters: k-means iterations.
    """

    LAYER_ROLE: ClassVar[str] = "none"

    def __init__(
        self,
        layer: LayerFactory | None = None,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        embedding: str = "full",
        k: int = 256,
        n_clusters: int = 1024,
        n_patches: int = 262144,
        dictionary: str = "kmeans",
        patch_size: int = 5,
        stride: int = 1,
        padding: int = 0,
        whitening: str = "pca",
        whitening_eps: float = 1e-3,
        pool_size: int = 4,
        pool_stride: int = 4,
        batch_norm: bool = True,
        bottleneck: int = 32,
        kmeans_iters: int = 25,
    ) -> None:
        super().__init__()
        for key, value, choices in (
            ("embedding", embedding, EMBEDDINGS),
            ("whitening", whitening, WHITENINGS),
            ("dictionary", dictionary, DICTIONARIES),
        ):
            if value not in choices:
                raise ValueError(f"{key}={value!r} is not supported; choose one of {choices}")
        for key, value, low in (
            ("k", k, 1), ("n_clusters", n_clusters, 1), ("n_patches", n_patches, 1),
            ("patch_size", patch_size, 1), ("stride", stride, 1), ("padding", padding, 0),
            ("pool_size", pool_size, 0), ("pool_stride", pool_stride, 0),
            ("bottleneck", bottleneck, 0), ("kmeans_iters", kmeans_iters, 1),
        ):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key}={value!r} is invalid; expected an integer ≥ {low}")
        if k > n_clusters:
            raise ValueError(
                f"k={k} nearest entries need a dictionary of at least k entries, but "
                f"n_clusters={n_clusters}; lower k or raise n_clusters"
            )
        if n_clusters > n_patches:
            raise ValueError(
                f"n_clusters={n_clusters} centroids need at least as many sampled patches, but "
                f"n_patches={n_patches}; raise n_patches or lower n_clusters"
            )
        if whitening_eps < 0:
            raise ValueError(f"whitening_eps={whitening_eps!r} must be ≥ 0")
        side = (image_size + 2 * padding - patch_size) // stride + 1
        if side < 1:
            raise ValueError(
                f"patch_size={patch_size} does not fit image_size={image_size} with "
                f"padding={padding}; lower patch_size or raise padding"
            )
        if pool_size and (pool_stride < 1 or pool_size > side):
            raise ValueError(
                f"pool_size={pool_size} / pool_stride={pool_stride} do not fit the {side}×{side} "
                "patch grid; use pool_size ≤ the grid side and pool_stride ≥ 1 (0 = no pooling)"
            )
        self.embedding, self.k, self.n_clusters, self.n_patches = (
            embedding,
            k,
            n_clusters,
            n_patches,
        )
        self.dictionary_kind, self.whitening_kind = dictionary, whitening
        self.patch_size, self.stride, self.padding = patch_size, stride, padding
        self.whitening_eps, self.kmeans_iters = float(whitening_eps), kmeans_iters
        self.seed = torch.initial_seed() % 2**31  # the run's seed: set before the net is built
        dim = in_channels * patch_size * patch_size
        # before the dictionary stage: Conv2d-style random entries, so the network runs (probe)
        bound = 1.0 / math.sqrt(dim)
        self.register_buffer("centroids", torch.empty(n_clusters, dim).uniform_(-bound, bound))
        self.register_buffer("whitening", torch.eye(dim))
        # 1.0 once the dictionary stage ran (float: weight-averaging callbacks average buffers)
        self.register_buffer("fitted", torch.zeros(()))
        self.conv = (
            nn.Conv2d(in_channels, n_clusters, patch_size, stride, padding)
            if embedding == "full"
            else None
        )
        self.pool = (
            nn.AvgPool2d(pool_size, pool_stride, ceil_mode=True) if pool_size else nn.Identity()
        )
        self.norm = nn.BatchNorm2d(n_clusters) if batch_norm else nn.Identity()
        self.bottleneck = nn.Conv2d(n_clusters, bottleneck, 1) if bottleneck else nn.Identity()
        pooled = math.ceil((side - pool_size) / pool_stride) + 1 if pool_size else side
        channels = bottleneck or n_clusters
        self.head = nn.Linear(channels * pooled * pooled, num_classes)

    # ---------------------------------------------------------------------------- embedding
    def patches(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, L, C·p·p) patches in ``F.unfold`` order."""
        return F.unfold(x, self.patch_size, padding=self.padding, stride=self.stride).transpose(
            1, 2
        )

    def nearest(self, x: Tensor) -> Tensor:
        """(B, L, k) indices of the k nearest dictionary entries of every whitened patch."""
        queries = self.patches(x) @ self.whitening
        keys = self.centroids.expand(x.shape[0], -1, -1)
        return knn_search(queries, keys, self.k, "euclidean", include_self=False)

    def embed(self, x: Tensor) -> Tensor:
        """(B, n_clusters, H', W'): Φ_hard indicator, times the per-entry linear map for Φ_full."""
        b, _, h, w = x.shape
        side_h = (h + 2 * self.padding - self.patch_size) // self.stride + 1
        side_w = (w + 2 * self.padding - self.patch_size) // self.stride + 1
        idx = self.nearest(x)
        mask = x.new_zeros(b, idx.shape[1], self.n_clusters).scatter_(-1, idx, 1.0)
        mask = mask.transpose(1, 2).reshape(b, self.n_clusters, side_h, side_w)
        return mask if self.conv is None else mask * self.conv(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, num_classes) logits."""
        features = self.bottleneck(self.norm(self.pool(self.embed(x))))
        return self.head(features.flatten(1))

    # ---------------------------------------------------------------------- dictionary stage
    @property
    def needs_data_stage(self) -> bool:
        """Whether the dictionary still has to be computed from data."""
        return bool(self.fitted < 0.5)

    def data_stage(
        self, batches: Iterable[Any], num_images: int, *, progress: bool = True
    ) -> dict[str, Tensor]:
        """Sample, whiten and cluster the patches of ``batches`` ((images, ...) tuples of the
        training split, unaugmented, fixed order; ``num_images`` in all). Returns the buffers to
        :meth:`load_data_stage` (the caller broadcasts them under DDP)."""
        g = torch.Generator().manual_seed(self.seed)
        per_image = None
        total = None
        chosen: Tensor | None = None
        sampled: list[Tensor] = []
        ssum: Tensor | None = None
        outer: Tensor | None = None
        count = 0
        seen = 0
        want = math.ceil(OVERSAMPLE * self.n_patches)
        desc = "patch dictionary: sampling patches"
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            x = (batch[0] if isinstance(batch, (tuple, list)) else batch).float().cpu()
            p = self.patches(x)  # (b, L, D)
            if per_image is None:
                per_image = p.shape[1]
                total = num_images * per_image
                chosen = torch.zeros(total, dtype=torch.bool)
                chosen[torch.randperm(total, generator=g)[: min(want, total)]] = True
            flat = p.reshape(-1, p.shape[-1])
            rows = chosen[seen * per_image : seen * per_image + flat.shape[0]]
            sampled.append(flat[rows])
            seen += x.shape[0]
            if self.dictionary_kind == "kmeans" and self.whitening_kind != "none":
                f64 = flat.double()
                ssum = f64.sum(0) if ssum is None else ssum + f64.sum(0)
                outer = f64.t() @ f64 if outer is None else outer + f64.t() @ f64
                count += f64.shape[0]
        if per_image is None or seen != num_images:
            raise ValueError(
                f"the training split gave {seen} images, expected num_images={num_images}"
            )
        dim = self.centroids.shape[1]
        if self.dictionary_kind == "gaussian":
            n = min(want, total)
            patches = torch.randn(n, dim, generator=g)
        else:
            patches = torch.cat(sampled)
        patches = patches[patches.norm(dim=1) >= MIN_PATCH_NORM][: self.n_patches]
        if patches.shape[0] < self.n_clusters:
            raise ValueError(
                f"n_clusters={self.n_clusters} exceeds the {patches.shape[0]} usable patches "
                f"sampled (n_patches={self.n_patches}; the training split has {total} patches, "
                f"patches of norm < {MIN_PATCH_NORM} dropped); lower n_clusters"
            )
        if self.whitening_kind == "none":
            cov = torch.eye(dim, dtype=torch.float64)
        elif ssum is not None:
            mean = ssum / count
            cov = outer / count - torch.outer(mean, mean)
        else:  # the covariance of the sampled patches
            centred = patches.double() - patches.double().mean(0)
            cov = centred.t() @ centred / patches.shape[0]
        w = whitening_matrix(cov, self.whitening_kind, self.whitening_eps)
        whitened = patches @ w
        log.info(
            "patch dictionary: k-means of %d whitened %d-dim patches into %d entries",
            whitened.shape[0], dim, self.n_clusters,
        )  # fmt: skip
        if whitened.shape[0] > self.n_clusters:
            centroids = kmeans(
                whitened, self.n_clusters, iters=self.kmeans_iters, seed=self.seed,
                progress=progress,
            )  # fmt: skip
        else:
            centroids = whitened
        return {"centroids": centroids.float(), "whitening": w.float()}

    def load_data_stage(self, state: dict[str, Tensor]) -> None:
        """Install the dictionary stage's result and mark the network fitted."""
        with torch.no_grad():
            self.centroids.copy_(state["centroids"])
            self.whitening.copy_(state["whitening"])
            self.fitted.fill_(1.0)
