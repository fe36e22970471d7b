"""The eager path (plain functions and autograd.Functions) and the custom-op path (used while
compiling) give identical results, and eager calls stay cheap: no custom-op dispatch, no
torch._dynamo import."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

import convnn.functional.budget as budget
from convnn import Conv1dNNAttention, Conv2dNN, Conv2dNNAttention, ConvNNAttention

CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "conv2dnn-padded": lambda: (Conv2dNN(4, 6, K=4, padding=1), torch.randn(2, 4, 6, 6)),
    "conv2dnn-random-euclidean": lambda: (
        Conv2dNN(4, 6, K=4, sampling_type="random", num_samples=10, magnitude_type="euclidean"),
        torch.randn(2, 4, 6, 6),
    ),
    "conv2dnn-spatial-matmul": lambda: (
        Conv2dNN(
            4, 6, K=4, padding=1, sampling_type="spatial", num_samples=3, magnitude_type="matmul"
        ),
        torch.randn(2, 4, 6, 6),
    ),
    "attention-standard-euclidean": lambda: (
        Conv2dNNAttention(4, 6, K=4, convolution_type="standard", magnitude_type="euclidean"),
        torch.randn(2, 4, 6, 6),
    ),
    "attention-depthwise-heads": lambda: (
        Conv1dNNAttention(4, 4, K=5, num_heads=2, padding=1),
        torch.randn(2, 4, 12),
    ),
    "attention-separable-dropout-sampled": lambda: (
        ConvNNAttention(
            4,
            K=4,
            convolution_type="depthwise-separable",
            attention_dropout=0.2,
            sampling_type="random",
            num_samples=6,
        ),
        torch.randn(2, 12, 4),
    ),
}


def _step(make: Callable[[], tuple[nn.Module, torch.Tensor]]) -> list[torch.Tensor]:
    """Output and every gradient of one training step from a fixed seed."""
    torch.manual_seed(0)
    layer, x = make()
    x.requires_grad_(True)
    out = layer.train()(x)
    out.square().sum().backward()
    return [out.detach(), x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_and_custom_op_paths_are_identical(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches an eager kernel or backward that drifts from the compiled path's op."""
    eager = _step(CASES[case])
    monkeypatch.setattr(budget, "_FORCE_CUSTOM_OPS", True)
    ops = _step(CASES[case])
    assert len(eager) == len(ops)
    for a, b in zip(eager, ops, strict=True):
        assert torch.equal(a, b)


def _op_events(make: Callable[[], tuple[nn.Module, torch.Tensor]]) -> set[str]:
    layer, x = make()
    x.requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x).sum().backward()
    return {e.name for e in prof.events() if e.name.startswith("convnn::")}


def test_eager_calls_skip_the_custom_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the eager path routing through the custom ops again (their dispatch costs
    ~0.4 ms per call and the first call imports torch._dynamo)."""
    for case in ("conv2dnn-padded", "attention-standard-euclidean"):
        assert _op_events(CASES[case]) == set()
    monkeypatch.setattr(budget, "_FORCE_CUSTOM_OPS", True)
    assert _op_events(CASES["conv2dnn-padded"]) == {
        "convnn::knn_search",
        "convnn::aggregate",
        "convnn::aggregate_backward",
    }
    assert _op_events(CASES["attention-standard-euclidean"]) == {
        "convnn::knn_search",
        "convnn::attend_projected",
        "convnn::attend_projected_backward",
    }


def test_first_training_step_loads_no_compiler_modules() -> None:
    """Catches a cold start that pulls in torch._dynamo (~1 s, ~150 MiB) or the flop counter
    (it imports triton) on the first forward/backward of a layer."""
    code = """
import sys, torch
import convnn
before = set(sys.modules)
x = torch.randn(2, 3, 6, 6, requires_grad=True)
for layer in (convnn.Conv2dNN(3, 4, K=4, padding=1), convnn.Conv2dNNAttention(3, 4, K=4)):
    layer(x).sum().backward()
heavy = ("torch._dynamo", "torch._inductor", "torch.utils.flop_counter", "triton")
print(sorted(m for m in sys.modules if m.split(".")[0] == "triton" or m in heavy))
print(len(set(sys.modules) - before))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    loaded, count = out.stdout.split("\n")[:2]
    assert loaded == "[]", out.stdout + out.stderr
    assert int(count) < 50, out.stdout  # ~900 when the custom ops ran eagerly


def _aten_events(layer: nn.Module, x: torch.Tensor) -> int:
    """All ``aten::`` profiler events of one forward + backward (nested ones and views too),
    after one warm-up step (one-off work such as building a cached search plan is left out)."""
    grad = torch.randn_like(layer(x))
    layer(x).backward(grad)
    layer(x).backward(grad)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x).backward(grad)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


# measured 187 and 513 events here after the warm-up step; the ceilings leave a few for
# harmless variation
@pytest.mark.parametrize(("cls", "ceiling"), [(Conv2dNN, 192), (Conv2dNNAttention, 518)])
def test_ops_per_training_step_do_not_grow(
    cls: type[nn.Module], ceiling: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches extra per-call ops (each one a kernel launch on a GPU): a 32×32 map, K = 9,
    padding 1, one work block, as in docs/performance.md (which measures B = 128, C = 64)."""
    monkeypatch.setattr(budget, "MEMORY_BUDGET", 4 * 2**30)
    torch.manual_seed(0)
    layer = cls(8, 8, K=9, padding=1)
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    assert _aten_events(layer, x) <= ceiling
