"""The LightningModule pieces: parameter groups, criteria, schedulers, SimpleNet."""

from __future__ import annotations

import io
import itertools
from functools import partial

import pytest
import torch
from torch import nn

from framework.schedulers import WarmupCosine
from models.layer_factory import LayerFactory
from models.module import ImageClassifier, param_groups
from models.simple import SimpleNet


def test_simple_net_shapes_and_role() -> None:
    net = SimpleNet(LayerFactory("conv"), in_channels=1, num_classes=7, num_layers=2,
                    channels=(8, 16, 32), dropout=0.1)
    assert SimpleNet.LAYER_ROLE == "2d"
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 7)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2
    with pytest.raises(ValueError, match="num_layers"):
        SimpleNet(LayerFactory("conv"), in_channels=1, num_classes=2, num_layers=5)


def test_no_weight_decay_on_norms_and_biases() -> None:
    net = SimpleNet(LayerFactory("conv"), in_channels=1, num_classes=3, num_layers=1,
                    channels=(4,))
    decay, no_decay = param_groups(net, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net.features[0].weight), id(net.head.weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight + bias, head bias


def test_mse_criterion_uses_one_hot_targets() -> None:
    net = nn.Linear(2, 3)
    module = ImageClassifier(net, 3, optimizer=partial(torch.optim.SGD, lr=0.1), criterion="mse")
    logits = torch.tensor([[1.0, 0.0, 0.0]])
    assert float(module.loss(logits, torch.tensor([0]))) == 0.0
    ce = ImageClassifier(net, 3, optimizer=partial(torch.optim.SGD, lr=0.1), label_smoothing=0.1)
    assert float(ce.loss(logits, torch.tensor([0]))) > 0


def test_warmup_cosine_schedule_and_safe_state() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, total_steps=20, steps_per_epoch=5, warmup_epochs=1, min_lr_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    assert lrs[5] == pytest.approx(1.0) and lrs[-1] > 0.1 and lrs[-1] < 0.2
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["warmup_steps"] == 5
