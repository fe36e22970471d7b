"""analysis=neighbours: statistics on hand-made records, geometry of ViT tokens, and a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from convnn import NeighborRecord
from framework.analysis import layer_geometry, layer_stats
from framework.checks import ConfigError, check_config
from framework.train import run

from .helpers import TINY, compose_cfg


def _record(indices: list, grid: tuple, shape: tuple, padding: int, weights=None) -> NeighborRecord:
    idx = torch.tensor(indices).view(1, 1, len(indices), -1)
    n = math.prod(shape)
    if len(grid) == 2:
        w = grid[1]
        qpos = torch.tensor(
            [(i // shape[1] + padding) * w + i % shape[1] + padding for i in range(n)]
        )
    else:
        qpos = torch.arange(n) + padding
    return NeighborRecord(
        indices=idx,
        weights=None if weights is None else torch.tensor(weights).view(idx.shape),
        query_positions=qpos,
        grid=grid,
        shape=shape,
        padding=padding,
        shuffle_scale=1,
        input_shape=shape,
        normalized_weights=weights is not None,
        layer_type="test",
    )


def test_stats_of_a_known_selection() -> None:
    # 2×2 map padded by 1 → 4×4 grid; queries at flat 5, 6, 9, 10. K = 2: self + one other.
    rec = _record([[5, 10], [6, 0], [9, 9], [10, 15]], (4, 4), (2, 2), 1)
    geo = layer_geometry(rec, image_size=2)
    s = layer_stats(rec, geo)
    dists = [0, math.sqrt(2), 0, math.sqrt(5), 0, 0, 0, math.sqrt(2)]
    assert s["distance_mean"] == pytest.approx(sum(dists) / 8)
    assert s["distance_fraction_mean"] == pytest.approx(sum(dists) / 8 / 2)
    assert s["distance_quantiles"]["q50"] == pytest.approx(0.0)
    assert s["fraction_in_3x3"] == pytest.approx(7 / 8)
    assert s["fraction_padding"] == pytest.approx(2 / 8)  # flat 0 and 15 are padding
    assert s["distinct_selected"] == 6 and s["distinct_fraction"] == pytest.approx(6 / 16)
    assert s["max_selection_share"] == pytest.approx(2 / 8)
    assert s["self_in_neighbours"] == 1.0 and s["entropy_mean"] is None


def test_entropy_of_attention_weights() -> None:
    rec = _record([[0, 1], [1, 0]], (2,), (2,), 0, weights=[[0.5, 0.5], [1.0, 0.0]])
    s = layer_stats(rec, layer_geometry(rec, image_size=2))
    assert s["entropy_mean"] == pytest.approx(math.log(2) / 2)
    assert s["entropy_normalized"] == pytest.approx(0.5)


def test_vit_tokens_map_to_the_patch_grid_and_cls_has_no_place() -> None:
    # CLS + 2×2 patches of 4 pixels; every query picks itself and token 1 (token 1: the CLS).
    rec = _record([[0, 1], [1, 0], [2, 1], [3, 1], [4, 1]], (5,), (5,), 0)
    geo = layer_geometry(rec, image_size=8, vit=(2, 4))
    assert geo.special.tolist() == [True, False, False, False, False]
    assert geo.xy[1:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert geo.side == 2 and geo.to_image == 4.0
    s = layer_stats(rec, geo)
    assert s["fraction_special"] == pytest.approx(2 / 10)
    # pairs with the CLS are dropped: 4 selves (0) and 1, 1, √2 from patches (0,1), (1,0), (1,1)
    assert s["distance_mean"] == pytest.approx((2 + math.sqrt(2)) / 7)


def test_bad_analysis_option_is_a_config_error(tmp_path: Path) -> None:
    bad = compose_cfg([*TINY, "analysis=neighbours", "analysis.num_images=0"], out=tmp_path)
    with pytest.raises(ConfigError, match=r"analysis\.num_images=0"):
        check_config(bad)
    bad = compose_cfg([*TINY, "analysis=neighbours", "analysis.name=bogus"], out=tmp_path)
    with pytest.raises(ConfigError, match="allowed values are none, neighbours"):
        check_config(bad)


def _strict_load(path: Path) -> dict:
    def bad(token: str) -> None:
        raise AssertionError(f"non-strict JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=bad)


def test_run_writes_stats_and_pictures_and_test_only_reproduces_them(tmp_path: Path) -> None:
    common = [
        *TINY,
        "layer=convnn",
        "layer.K=4",
        "layer.padding=1",
        "analysis=neighbours",
        "analysis.num_images=4",
    ]
    out = tmp_path / "train"
    run(compose_cfg([*common, "logger=tensorboard"], out=out))
    stats = _strict_load(out / "neighbours" / "stats.json")
    layers = stats["layers"]
    assert sorted(layers) == ["features.0", "features.3"]
    for s in layers.values():
        assert s["images"] == 4 and s["K"] == 4
        for key in ("distance_mean", "fraction_in_3x3", "fraction_padding", "distinct_selected"):
            assert isinstance(s[key], float) and s[key] >= 0.0
    pngs = sorted(p.name for p in (out / "neighbours").glob("*.png"))
    assert pngs == ["distances.png", "layer_features.0.png", "layer_features.3.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert sorted(t for t in events.Tags()["images"] if t.startswith("neighbours/")) == [
        f"neighbours/{p[:-4]}" for p in pngs
    ]
    ckpt = next((out / "checkpoints").glob("best-*.ckpt"))
    again = tmp_path / "test_only"
    run(compose_cfg([*common, "test_only=true", f"init_from={ckpt}"], out=again))
    assert _strict_load(again / "neighbours" / "stats.json") == stats


def test_pictures_have_a_legend_and_plain_titles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader needs to know what the stars, dots and margin are, and which layer it is."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from framework.analysis import _plot_layer

    saved: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    rec = _record([[5, 10], [6, 0], [9, 9], [10, 15]], (4, 4), (2, 2), 1)
    geo = layer_geometry(rec, image_size=2)
    _plot_layer("features.3.first", rec, geo, torch.zeros(1, 2, 2, 1), 2, tmp_path, (2, 3))
    (fig,) = saved
    title = fig.get_suptitle()
    assert title.startswith("What layer 2 of 3 (number 2 ConvNN-family layer) looks at")
    assert "`features.3.first` (test, K=2, on a 2×2 map)" in title
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [
        "query (star)",
        "its K neighbours (dots, same colour)",
        "zero padding: dots in the margin around the image",
    ]
