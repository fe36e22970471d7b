"""net=ccnn against CCNN's ResNet_image/S4Block, and the mask learning rate (mask_lr_ratio)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convnn import FlexConv2d, from_ccnn_state_dict
from models.ccnn import CCNN
from models.layer_factory import LayerFactory
from models.module import param_groups
from tests.convnn.ccnn_reference import CCNNConv

LAYER = dict(
    kernel_size=9, kernel_no_hidden=8, kernel_omega_0=10.0, separable=True, mask_init_value=0.3
)


class RefS4Block(nn.Module):
    """CCNN's models/modules/s4_block.py (prenorm), names kept."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = CCNNConv(channels, channels, separable=True, flex=True, mask_init_value=0.3)
        self.nonlinears = nn.ModuleList((nn.GELU(), nn.GELU()))
        self.norm1 = nn.BatchNorm2d(channels)
        self.linear1 = nn.Conv2d(channels, channels, 1)
        self.dp = nn.Dropout2d(dropout)
        self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.norm1(x)
        return (
            self.nonlinears[1](self.linear1(self.dp(self.nonlinears[0](self.conv1(x))))) + shortcut
        )


class RefResNetImage(nn.Module):
    """CCNN's models/resnet.py ResNet_image with S4 blocks, names kept."""

    def __init__(self, in_channels: int, hidden: int, blocks: int, classes: int, pools: list[int]):
        super().__init__()
        self.dropout_in = nn.Dropout(0.0)
        self.conv1 = CCNNConv(in_channels, hidden, separable=True, flex=True, mask_init_value=0.3)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.nonlinear = nn.GELU()
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers.append(RefS4Block(hidden, 0.1))
            if i in pools:
                layers.append(nn.MaxPool2d(kernel_size=2))
        self.blocks = nn.Sequential(*layers)
        self.out_layer = nn.Conv2d(hidden, classes, 1)
        self.out_norm = nn.BatchNorm2d(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.nonlinear(self.norm1(self.conv1(self.dropout_in(x))))
        out = self.out_norm(self.blocks(out))
        out = torch.nn.functional.adaptive_avg_pool2d(out, (1, 1))
        return self.out_layer(out).squeeze()


def test_a_ccnn_network_state_dict_loads_and_gives_the_same_logits() -> None:
    # Catches: block order (norm → layer → GELU → dropout → 1×1 → GELU), a shortcut taken after
    # the pre-norm, the pool position, the head, or module names that differ from CCNN's.
    torch.manual_seed(0)
    ref = RefResNetImage(3, 6, 3, 5, pools=[1]).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = CCNN(
        LayerFactory("flexconv", **LAYER),
        3,
        5,
        16,
        no_hidden=6,
        no_blocks=3,
        dropout=0.1,
        downsampling=[1],
    ).double()
    ours.load_state_dict(from_ccnn_state_dict(ref.state_dict()), strict=True)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    ref.train(), ours.train()
    torch.manual_seed(1)
    expected = ref(x)
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x), expected, rtol=1e-9, atol=1e-10)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["conv", "ckconv", "flexconv"])
def test_ccnn_takes_any_2d_layer_kind(kind: str) -> None:
    options = {} if kind == "conv" else {k: v for k, v in LAYER.items() if k != "mask_init_value"}
    net = CCNN(LayerFactory(kind, **options), 3, 7, 8, no_hidden=4, no_blocks=2, downsampling=[0])
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"no_blocks": 0}, "no_blocks=0 is invalid; expected an integer >= 1"),
        ({"dropout": 1.0}, r"dropout=1.0 is invalid; expected a probability in \[0, 1\)"),
        ({"dropout_type": "AlphaDropout"}, "dropout_type='AlphaDropout' is invalid; choose one of"),
        ({"downsampling": [4]}, r"downsampling=\[4\] is invalid; expected distinct block indices"),
        ({"downsampling": [0, 1, 2], "downsampling_size": 4}, "downsampling_size=4 is invalid"),
    ],
)
def test_bad_network_options_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CCNN(LayerFactory("conv"), 3, 10, 32, **kwargs)


def test_mask_lr_ratio_reaches_exactly_the_mask_parameters() -> None:
    # Catches CCNN's bug: its filter ("mask_params" in the name, FlexConv instances only) matched
    # no parameter, so optimizer.mask_lr_ratio never applied.
    net = nn.Sequential(
        FlexConv2d(2, 3, 9, separable=True, mask_learn_mean=True),
        FlexConv2d(3, 3, 9),
        nn.Conv2d(3, 3, 1),
    )
    groups = param_groups(net, 0.01, lr=0.02, mask_lr_ratio=0.5)
    mask = {id(p) for m in net if isinstance(m, FlexConv2d) for p in m.mask_parameters()}
    assert len(mask) == 3
    assert {id(p) for p in groups[-1]["params"]} == mask
    assert groups[-1]["lr"] == pytest.approx(0.01) and groups[-1]["weight_decay"] == 0.0
    assert all("lr" not in g for g in groups[:-1])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    opt = torch.optim.AdamW(groups, lr=0.02)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.02, 0.01]
