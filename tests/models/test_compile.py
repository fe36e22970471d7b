"""CUDA-graph readiness checked on CPU: a few compiled training steps of VGG / ResNet / ViT with
ConvNN, ConvNN-Attention and Branching layers run as one graph (no graph break) that is never
recompiled, and a layer's step creates no host tensor (what ``compile_mode=reduce-overhead``,
i.e. CUDA graphs, needs on a GPU)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from convnn import Branching, Conv2dNN, Conv2dNNAttention
from models.layer_factory import LayerFactory
from models.module import COMPILE_MODES, ImageClassifier
from models.resnet import ResNet
from models.vgg import VGG
from models.vit import ViT

LAYERS = {
    "convnn": {"K": 3, "padding": 1},
    "convnn_attn": {"K": 3, "padding": 1, "num_heads": 2},
    "branching": {"K": 3, "padding": 1},
}
NETS: dict[str, Callable[[LayerFactory], nn.Module]] = {
    "vgg11": lambda layer: VGG(layer, width_multiplier=1 / 16, dropout=0.0),
    "resnet18": lambda layer: ResNet(layer, image_size=16, base_width=4),
    "vit": lambda layer: ViT(layer, image_size=16, dim=8, depth=1, mlp_dim=16),
}
SIZE = {"vgg11": 32, "resnet18": 16, "vit": 16}
# every net and every layer kind once; the ViT case is fast (~10 s on a busy 2-core machine),
# the CNNs (8 and 16 ConvNN layers to trace) are slow tests
CASES = [
    pytest.param("vgg11", "convnn", marks=pytest.mark.slow),
    pytest.param("resnet18", "convnn_attn", marks=pytest.mark.slow),
    ("vit", "branching"),
]


def _train_steps(net_name: str, layer_name: str, steps: int = 3) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = NETS[net_name](LayerFactory(layer_name, **LAYERS[layer_name])).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(steps):
            x = torch.randn(2, 3, SIZE[net_name], SIZE[net_name])
            loss = compiled(x).logsumexp(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert torch.isfinite(loss), step
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize(("net_name", "layer_name"), CASES)
def test_compiled_training_steps_have_one_graph_and_no_recompile(
    net_name: str, layer_name: str
) -> None:
    """Catches a graph break (a Python-side value in the step) or a recompile after a weight
    update (a guard on something that changes per step); both would defeat CUDA graphs."""
    _train_steps(net_name, layer_name)


class _HostTensors(TorchDispatchMode):
    """Records every op that returns a CPU tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.ops.append(str(func))
        return out


def _conv(i: int, o: int) -> nn.Module:
    return nn.Conv2d(i, o, 3, padding=1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Conv2dNN(4, 4, K=4, padding=1),
        lambda: Conv2dNN(4, 4, K=4, padding=1, sampling_type="random", num_samples=8),
        lambda: Conv2dNN(4, 4, K=4, padding=1, sampling_type="spatial", num_samples=3),
        lambda: Conv2dNNAttention(4, 4, K=4, padding=1, attention_dropout=0.1, num_heads=2),
        lambda: Branching(4, 6, lambda i, o: Conv2dNN(i, o, K=4, padding=1), _conv),
    ],
    ids=["convnn", "random", "spatial", "attention", "branching"],
)
def test_a_device_step_creates_no_host_tensor(make: Callable[[], nn.Module]) -> None:
    """On the meta device (a stand-in for a GPU), one training step after a warm-up creates
    no CPU tensor: catches a per-step host constant (a blocking copy, a CUDA-graph breaker)."""
    layer = make().to("meta").train()
    x = torch.randn(2, 4, 8, 8, device="meta", requires_grad=True)
    layer(x).sum().backward()  # warm-up: constants are built and cached once per device
    with _HostTensors() as seen:
        layer(x).sum().backward()
    assert seen.ops == []


def test_compile_mode_reaches_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the compile_mode key being dropped on its way to ``torch.compile``."""
    seen: dict[str, object] = {}

    def fake_compile(self: nn.Module, *args: object, **kwargs: object) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(nn.Module, "compile", fake_compile)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    ImageClassifier(net, 3, torch.optim.SGD, compile=True, compile_mode="reduce-overhead")
    assert seen == {"mode": "reduce-overhead"}
    assert "default" in COMPILE_MODES and "reduce-overhead" in COMPILE_MODES
    with pytest.raises(ValueError, match="compile_mode='fast' is not one of"):
        ImageClassifier(net, 3, torch.optim.SGD, compile=True, compile_mode="fast")
