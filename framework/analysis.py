"""``analysis=neighbours``: which neighbours every ConvNN layer selects, as statistics and pictures.

For a fixed, seeded set of test images the network runs once under
:func:`convnn.record_neighbors`; per layer we write statistics to
``<run dir>/neighbours/stats.json`` and one picture of the selected neighbours, plus a plot of
the per-layer distance distributions (``distances.png``). Pictures also go to W&B / TensorBoard.
"""

from __future__ import annotations

import logging
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig
from torch import Tensor, nn

from convnn import NeighborRecord, record_neighbors
from framework.jsonio import finite_or_none, write_json

__all__ = ["LayerGeometry", "analyse_neighbours", "layer_geometry", "layer_stats", "maybe_analyse"]

log = logging.getLogger(__name__)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass
class LayerGeometry:
    """Where a layer's tokens sit: ``xy`` (Np, 2) (row, col) in the layer's own grid (padding
    outside ``[0, side)``), ``special`` (Np,) tokens without a place (a ViT's CLS), ``pad`` (Np,)
    padding tokens, ``side`` the map side, ``to_image`` image pixels per grid cell."""

    xy: Tensor
    special: Tensor
    pad: Tensor
    side: int
    to_image: float


def _vit_patches(net: nn.Module) -> tuple[int, int] | None:
    """(patches per side, patch size) of a ViT-like backbone with a CLS token, else None."""
    size, patch = getattr(net, "image_size", None), getattr(net, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and hasattr(net, "cls_token"):
        return size // patch, patch
    return None


def layer_geometry(
    rec: NeighborRecord, image_size: int, vit: tuple[int, int] | None = None
) -> LayerGeometry:
    """Place every padded-map token of ``rec``; ``vit`` maps 1-D token sequences of a ViT
    (CLS + P×P patches) onto the patch grid."""
    coords = rec.coordinates()
    pad = rec.is_padding()
    special = torch.zeros_like(pad)
    if rec.spatial_dims == 2:
        xy = coords.float()
        side = max(rec.shape)
        scale = image_size / rec.input_shape[0] * rec.shuffle_scale
        return LayerGeometry(xy, special, pad, side, scale)
    t = coords[:, 0] * rec.shuffle_scale  # first original token of each (unshuffled) token
    if vit is not None and rec.input_shape[0] == vit[0] ** 2 + 1:
        per_side, patch = vit
        special = (t == 0) | pad  # the CLS token (and sequence padding) has no patch
        patch_idx = (t - 1).clamp(min=0, max=per_side**2 - 1)
        xy = torch.stack([patch_idx // per_side, patch_idx % per_side], dim=1).float()
        return LayerGeometry(xy, special, pad, per_side, float(patch))
    xy = torch.stack([torch.zeros_like(t), t], dim=1).float()
    return LayerGeometry(xy, special, pad, rec.input_shape[0], 0.0)


def _quantiles(values: Tensor) -> dict[str, float | None]:
    if values.numel() == 0:
        return {f"q{round(q * 100)}": None for q in QUANTILES}
    qs = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"q{round(q * 100)}": float(v) for q, v in zip(QUANTILES, qs)}


def _mean(values: Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def layer_stats(rec: NeighborRecord, geo: LayerGeometry) -> dict[str, Any]:
    """Locality, padding use, hubness and (attention) gate entropy of one layer's selections."""
    idx = rec.indices  # (B, h, Nq, K)
    q = rec.query_positions.view(1, 1, -1, 1).expand_as(idx)
    placed = ~geo.special[idx] & ~geo.special[q]
    diff = geo.xy[idx] - geo.xy[q]
    dist = diff.norm(dim=-1)[placed]
    near = (diff.abs().amax(dim=-1) <= 1)[placed]
    b, np_tokens = idx.shape[0], geo.xy.shape[0]
    counts = torch.zeros(b, np_tokens)
    counts.scatter_add_(1, idx.reshape(b, -1), torch.ones(b, idx[0].numel()))
    stats: dict[str, Any] = {
        "layer_type": rec.layer_type,
        "K": int(idx.shape[-1]),
        "heads": int(idx.shape[1]),
        "grid": list(rec.grid),
        "map_shape": list(rec.shape),
        "padding": rec.padding,
        "shuffle_scale": rec.shuffle_scale,
        "images": int(b),
        "queries_per_image": int(idx.shape[2]),
        "distance_mean": _mean(dist),
        "distance_quantiles": _quantiles(dist),
        "distance_fraction_mean": _mean(dist / geo.side),
        "distance_fraction_quantiles": _quantiles(dist / geo.side),
        "fraction_in_3x3": _mean(near.float()),
        "fraction_padding": _mean(geo.pad[idx].float()),
        "fraction_special": _mean((geo.special & ~geo.pad)[idx].float()),
        "self_in_neighbours": _mean((idx == q).any(dim=-1).float()),
        "distinct_selected": _mean((counts > 0).sum(dim=1).float()),
        "distinct_fraction": _mean((counts > 0).float().mean(dim=1)),
        "max_selection_share": _mean(counts.amax(dim=1) / idx[0].numel()),
        "entropy_mean": None,
        "entropy_normalized": None,
    }
    w = rec.weights
    if w is not None and rec.normalized_weights:
        ent = -(w * w.clamp_min(1e-12).log()).sum(dim=-1)
        stats["entropy_mean"] = _mean(ent)
        k = idx.shape[-1]
        stats["entropy_normalized"] = _mean(ent / math.log(k)) if k > 1 else None
    return stats


def _pick_images(dm: Any, num: int, seed: int) -> Tensor:
    """``num`` test images chosen by ``seed`` (the same for every run and checkpoint)."""
    if dm.test_set is None:
        dm.setup("test")
    n = len(dm.test_set)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(num, n)]
    return torch.stack([dm.test_set[int(i)][0] for i in order])


def _display(images: Tensor, mean: Any, std: Any) -> Tensor:
    """Undo the normalisation for display: (B, H, W, C) in [0, 1]."""
    c = images.shape[1]
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1).expand(1, c, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1).expand(1, c, 1, 1)
    return (images * s + m).clamp(0, 1).permute(0, 2, 3, 1)


def _slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path) or "root"


def _pick_queries(qpos: Tensor, geo: LayerGeometry, num: int) -> Tensor:
    """Indices of ``num`` placed queries spread along the map's diagonal (nearest to
    j/(num+1) of the way, j = 1..num)."""
    xy = geo.xy[qpos]
    far = torch.where(geo.special[qpos], math.inf, 0.0)
    hi = xy[~geo.special[qpos]].amax(dim=0)
    picks = []
    for j in range(1, num + 1):
        target = hi * j / (num + 1)
        picks.append(int(((xy - target).norm(dim=1) + far).argmin()))
    return torch.tensor(sorted(set(picks)), dtype=torch.long)


def layer_title(path: str, rec: NeighborRecord, number: int, total: int) -> str:
    """A picture's title in plain words, then the layer's module path and type."""
    k = rec.indices.shape[-1]
    where = "the first" if number == 1 else "the last" if number == total else f"number {number}"
    shape = "×".join(map(str, rec.shape))
    return (
        f"What layer {number} of {total} ({where} ConvNN-family layer) looks at: each query ★ "
        f"and the {k} positions it takes its neighbours from\n"
        f"`{path}` ({rec.layer_type}, K={k}, on a {shape} map"
        + (", head 0 shown)" if rec.indices.shape[1] > 1 else ")")
    )


def _legend_entries(padding: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, marker style) of the picture legend."""
    entries = [
        ("query (star)", {"marker": "*", "markersize": 12, "markeredgecolor": "black"}),
        ("its K neighbours (dots, same colour)", {"marker": "o", "markersize": 6,
                                                 "markeredgecolor": "white"}),
    ]
    if padding:
        entries.append(("zero padding: dots in the margin around the image",
                        {"marker": "s", "markersize": 6, "markerfacecolor": "none"}))
    return entries


def _plot_layer(
    path: str,
    rec: NeighborRecord,
    geo: LayerGeometry,
    shown: Tensor,
    num_queries: int,
    out: Path,
    position: tuple[int, int] = (1, 1),
) -> Path:
    """The images with ``num_queries`` queries (stars) and their K neighbours (dots, head 0),
    a legend, and a title in plain words (``position``: this layer's number and the count)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    b = shown.shape[0]
    cols = min(4, b)
    rows = math.ceil(b / cols)
    width = max(3.0 * cols, 6.5)  # room for the title and the legend with one image too
    legend_rows = 1 if width >= 10 else 3
    fig, axes = plt.subplots(
        rows, cols, figsize=(width, 3 * rows + 0.9 + 0.2 * legend_rows), squeeze=False
    )
    qpos = rec.query_positions
    picks = _pick_queries(qpos, geo, num_queries)
    colours = plt.get_cmap("tab10")
    h, w = shown.shape[1:3]
    margin = rec.padding * geo.to_image
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= b:
            continue
        img = shown[i]
        shown_img = (img.squeeze(-1) if img.shape[-1] == 1 else img).numpy()
        ax.imshow(shown_img, cmap="gray", vmin=0, vmax=1, alpha=0.75)
        for j, qi in enumerate(picks.tolist()):
            colour = colours(j % 10)
            nbrs = rec.indices[i, 0, qi]
            nbrs = nbrs[~geo.special[nbrs]]
            qy, qx = ((geo.xy[qpos[qi]] + 0.5) * geo.to_image - 0.5).tolist()
            pts = ((geo.xy[nbrs] + 0.5) * geo.to_image - 0.5).numpy()
            for ny, nx in pts.tolist():
                ax.plot([qx, nx], [qy, ny], color=colour, lw=0.8, alpha=0.6)
            ax.scatter(pts[:, 1], pts[:, 0], s=28, color=colour, edgecolors="white", lw=0.5)
            ax.scatter([qx], [qy], s=140, marker="*", color=colour, edgecolors="black", lw=0.6)
        ax.set_xlim(-0.5 - margin, w - 0.5 + margin)
        ax.set_ylim(h - 0.5 + margin, -0.5 - margin)
    title = layer_title(path, rec, *position)
    chars = int(width * 12)
    fig.suptitle("\n".join(textwrap.fill(t, chars) for t in title.split("\n")), fontsize=9)
    handles = [
        Line2D([], [], linestyle="none", color="tab:blue", label=label, **style)
        for label, style in _legend_entries(margin > 0)
    ]
    ncol = len(handles) if legend_rows == 1 else 1
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.25 * legend_rows / fig.get_figheight(), 1, 1))
    file = out / f"layer_{_slug(path)}.png"
    fig.savefig(file, dpi=80)
    plt.close(fig)
    return file


def _plot_distances(distances: dict[str, Tensor], out: Path) -> Path:
    """One box per layer (in network order): neighbour distance as a fraction of the map side."""
    import matplotlib.pyplot as plt

    names = list(distances)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 4.5))
    data = [d.numpy() if d.numel() else [math.nan] for d in distances.values()]
    ax.boxplot(data, whis=(5, 95), showfliers=False, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("query–neighbour distance / map side")
    ax.set_title("How local is each layer? (box: quartiles, whiskers: 5–95 %, ▲ mean)")
    fig.tight_layout()
    file = out / "distances.png"
    fig.savefig(file, dpi=80)
    plt.close(fig)
    return file


def analyse_neighbours(
    net: nn.Module,
    images: Tensor,
    out: Path,
    *,
    mean: Any = (0.5,),
    std: Any = (0.5,),
    num_queries: int = 3,
    pictures: bool = True,
) -> tuple[dict[str, Any], list[Path]]:
    """Record ``net`` on ``images``; write ``stats.json`` and pictures in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        # a compiled net (compile=true) runs its eager forward here: recording is Python-side
        call = net.forward if getattr(net, "_compiled_call_impl", None) is not None else net
        with torch.no_grad(), record_neighbors(net) as records:
            call(images.to(device))
    finally:
        net.train(was_training)
    vit = _vit_patches(net)
    image_size = int(images.shape[-2])
    stats: dict[str, Any] = {}
    distances: dict[str, Tensor] = {}
    files: list[Path] = []
    shown = _display(images.cpu().float(), mean, std)
    for number, (path, rec) in enumerate(records.items(), 1):
        geo = layer_geometry(rec, image_size, vit)
        stats[path] = layer_stats(rec, geo)
        idx = rec.indices
        q = rec.query_positions.view(1, 1, -1, 1).expand_as(idx)
        placed = ~geo.special[idx] & ~geo.special[q]
        distances[path] = ((geo.xy[idx] - geo.xy[q]).norm(dim=-1)[placed] / geo.side).float()
        if pictures and geo.to_image > 0:
            position = (number, len(records))
            files.append(_plot_layer(path, rec, geo, shown, num_queries, out, position))
    if pictures and records:
        files.append(_plot_distances(distances, out))
    data = finite_or_none({"layers": stats, "images": int(images.shape[0])})
    write_json(out / "stats.json", data, sort_keys=False)  # layers in network order
    if not records:
        log.warning("analysis=neighbours: the network has no ConvNN layer; nothing recorded")
    return data, files


def _log_pictures(loggers: list[Logger], files: list[Path], step: int) -> None:
    import matplotlib.image as mpimg

    for lg in loggers:
        for file in files:
            key = f"neighbours/{file.stem}"
            if isinstance(lg, WandbLogger):
                lg.log_image(key=key, images=[str(file)], step=step)
            elif isinstance(lg, TensorBoardLogger):
                img = mpimg.imread(str(file))[..., :3]
                lg.experiment.add_image(key, img, global_step=step, dataformats="HWC")


def maybe_analyse(
    cfg: DictConfig,
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: Any,
    loggers: list[Logger],
    run_dir: Path,
) -> None:
    """Run ``cfg.analysis`` (if any) on the tested weights, on rank 0."""
    a = cfg.get("analysis")
    if not a or a.get("name", "none") == "none" or not trainer.is_global_zero:
        return
    images = _pick_images(datamodule, int(a.num_images), int(a.seed))
    data, files = analyse_neighbours(
        model.net,
        images,
        run_dir / "neighbours",
        mean=datamodule.mean,
        std=datamodule.std,
        num_queries=int(a.num_queries),
    )
    _log_pictures(loggers, files, trainer.global_step)
    log.info(
        "analysis=neighbours: %d layers, %d pictures in %s",
        len(data["layers"]),
        len(files),
        run_dir / "neighbours",
    )
