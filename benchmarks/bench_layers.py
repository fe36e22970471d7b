"""Forward+backward time and peak memory of the ConvNN layers.

Compares, in one run and at the same shapes:

* ``Conv2dNN`` and ``Conv2dNNAttention`` for the sampling types ``all``, ``random`` (M candidates)
  and ``spatial`` (an n×n grid);
* the **straightforward** formulation of the original code, written here as the baseline: a full
  B×N×N cosine score matrix, top-K with self forced to slot 0 (the diagonal is filled with a
  winning value), the input expanded to (B, C, N, K) and copied, gathered, then aggregated by a
  stride-K ``nn.Conv1d(C, O, K, stride=K)``;
* a 3×3 ``nn.Conv2d`` with padding 1;
* ViG's ``Grapher`` block (C → C, edge graph convolution over the K nearest of all tokens by
  L2-normalised features): the best-known feature-space kNN layer, for reference.

Every case runs in a **fresh subprocess**, so that its peak memory is its own:

* CPU: after imports, module and input creation and a tiny warm-up call (thread pools, lazy
  kernel initialisation), the process's peak-RSS mark is reset (``/proc/self/clear_refs`` ← 5,
  Linux ≥ 4.0) and the current RSS is the baseline; one forward+backward step follows and the
  peak growth is ``VmHWM − baseline``. Where the reset is not allowed, ``ru_maxrss`` is used and
  the number is flagged as a lower bound when an earlier transient peak hides the step's peak.
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  memory allocated at the baseline.

The memory step is the first full-size step of the process; time is then measured over
``--repeats`` further steps after one warm-up step (fewer where ``--case-budget`` seconds would be
exceeded, at least 3; the table lists how many). Forward and backward are timed separately and
summed per repeat; the table shows the median with its inter-quartile range and min–max.

The straightforward baseline is skipped, with the memory it would need, where its score matrix
alone exceeds the machine's memory (or its estimated total exceeds ``--mem-limit-gib``).

Usage::

    python benchmarks/bench_layers.py                    # full default run (~5-8 min, 2 cores)
    python benchmarks/bench_layers.py --quick --out /tmp/x   # smoke run (< 1 min)
    python benchmarks/bench_layers.py --sizes 32 --layers convnn,straightforward --profile

Results: ``<out>/layers.md`` (tables, machine, date, exact command, target verdicts) and
``<out>/layers.json`` (raw numbers); ``--profile`` adds ``<out>/profile_*.txt``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

REPO = Path(__file__).resolve().parents[1]
RESULT_MARK = "BENCH_RESULT_JSON "
MIB = 1024**2
GIB = 1024**3
LAYER_KINDS = ("conv2d", "straightforward", "convnn", "attention", "ckconv", "flexconv", "grapher")
#: Kinds without a neighbour search: one case per shape, no sampling types.
PLAIN_KINDS = ("conv2d", "straightforward", "ckconv", "flexconv", "grapher")
SAMPLINGS = ("all", "random", "spatial")
KIND_LABEL = {
    "conv2d": "nn.Conv2d 3×3",
    "straightforward": "straightforward (dense)",
    "convnn": "Conv2dNN",
    "attention": "Conv2dNNAttention",
    "ckconv": "CKConv2d separable 33×33 (CCNN)",
    "flexconv": "FlexConv2d separable 33×33, cropped (CCNN)",
    "grapher": "ViG Grapher (edge)",
}


# ------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One benchmark case: a layer kind with its options at one input shape."""

    kind: str
    batch: int
    channels: int
    out_channels: int
    height: int
    width: int
    K: int = 9
    sampling: str = "all"
    num_samples: int = -1
    magnitude_type: str = "cosine"

    @property
    def name(self) -> str:
        """Human-readable case name (layer + sampling)."""
        label = KIND_LABEL[self.kind]
        if self.kind in ("conv2d", "ckconv", "flexconv", "grapher"):
            return label
        if self.kind == "straightforward":
            return f"{label}, all"
        extra = {"all": "", "random": f" M={self.num_samples}", "spatial": f" n={self.num_samples}"}
        return f"{label} {self.sampling}{extra[self.sampling]}"

    @property
    def shape(self) -> str:
        """Shape string, e.g. ``B32 C64→64 32×32 K9``."""
        k = "" if self.kind in ("conv2d", "ckconv", "flexconv") else f" K{self.K}"
        return (
            f"B{self.batch} C{self.channels}→{self.out_channels} "
            f"{self.height}×{self.width}{k}"
        )

    @property
    def shape_key(self) -> tuple[int, int, int, int, int]:
        """Cases with the same key are compared with each other."""
        return (self.batch, self.channels, self.out_channels, self.height, self.width)


@dataclass
class Result:
    """What one case produced (times in ms, memory in bytes)."""

    case: Case
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    repeats: int = 0
    times_ms: list[float] = field(default_factory=list)
    fwd_ms: list[float] = field(default_factory=list)
    bwd_ms: list[float] = field(default_factory=list)
    first_step_ms: float = math.nan
    peak_growth_bytes: float = math.nan
    peak_abs_bytes: float = math.nan
    baseline_bytes: float = math.nan
    memory_method: str = ""
    memory_reliable: bool = True
    tensor_peak_bytes: float = math.nan  # CPU: peak bytes of live tensors (profiler events)
    needed_bytes: float = math.nan
    wall_s: float = math.nan
    loadavg_1min: float = math.nan  # right after the case: > threads means a shared, noisy CPU

    def median(self, key: str = "times_ms") -> float:
        """Median of one of the time lists (NaN when empty)."""
        values = getattr(self, key)
        return statistics.median(values) if values else math.nan


def straightforward_bytes(case: Case) -> tuple[float, float]:
    """(bytes of the B×N×N float32 score matrix, estimated peak bytes of the whole step)."""
    n = case.height * case.width
    scores = 4.0 * case.batch * n * n
    expanded = 4.0 * case.batch * case.channels * n * case.K  # one (B, C, N, K) float32 tensor
    # scores + the expanded copy + the gathered copy, and in backward the gathered grad and the
    # scatter target of the same size.
    return scores, scores + 3 * expanded


# ------------------------------------------------------------------------- the baseline
def make_straightforward(in_channels: int, out_channels: int, K: int) -> nn.Module:
    """The original formulation as an ``nn.Module`` (built lazily so the parent needs no torch)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class StraightforwardConv2dNN(nn.Module):
        """Dense cosine scores, top-K with self at slot 0, expand+copy, gather, stride-K Conv1d."""

        def __init__(self) -> None:
            super().__init__()
            self.K = K
            self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=K, stride=K)

        def _cosine(self, v: torch.Tensor) -> torch.Tensor:
            vn = F.normalize(v, p=2, dim=1)
            scores = torch.matmul(vn.transpose(2, 1), vn)  # (B, N, N), built with autograd on
            torch.diagonal(scores, dim1=1, dim2=2).fill_(math.inf)  # self always wins
            return scores

        def _prime(self, v: torch.Tensor, qk: torch.Tensor) -> torch.Tensor:
            b, c, t = v.shape
            _, idx = torch.topk(qk, k=self.K, dim=2, largest=True)
            idx_exp = idx.unsqueeze(1).expand(b, c, t, self.K)
            v_exp = v.unsqueeze(-1).expand(b, c, t, self.K).contiguous()  # K copies of the input
            prime = torch.gather(v_exp, dim=2, index=idx_exp)  # (B, C, N, K)
            return prime.reshape(b, c, t * self.K)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, _, h, w = x.shape
            v = x.flatten(2)
            scores = self._cosine(v)  # stays alive until the end of forward, as in the original
            prime = self._prime(v, scores)
            out = self.conv(prime)  # (B, O, N)
            return out.reshape(b, -1, h, w)

    return StraightforwardConv2dNN()


def build_module(case: Case) -> nn.Module:
    """Instantiate the layer of ``case`` (imports ``convnn`` only when needed)."""
    from torch import nn

    if case.kind == "conv2d":
        return nn.Conv2d(case.channels, case.out_channels, kernel_size=3, padding=1)
    if case.kind == "straightforward":
        return make_straightforward(case.channels, case.out_channels, case.K)
    import convnn

    if case.kind in ("ckconv", "flexconv"):  # CCNN's image setting (CCNN-4,140's kernel flags)
        cont = convnn.CKConv2d if case.kind == "ckconv" else convnn.FlexConv2d
        return cont(case.channels, case.out_channels, kernel_size=33, separable=True)
    if case.kind == "grapher":  # the whole Grapher block (C → C), edge convolution, k = K
        return convnn.Grapher(case.channels, kernel_size=case.K)
    cls = convnn.Conv2dNN if case.kind == "convnn" else convnn.Conv2dNNAttention
    return cls(
        case.channels,
        case.out_channels,
        K=case.K,
        sampling_type=case.sampling,
        num_samples=case.num_samples,
        magnitude_type=case.magnitude_type,
    )


# ------------------------------------------------------------------------- memory probes
def _proc_status_bytes(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (NaN where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.nan


def _maxrss_bytes() -> float:
    """``ru_maxrss`` in bytes (KiB on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return not math.isnan(_proc_status_bytes("VmHWM"))


def _tensor_peak_bytes(step: Any) -> float:
    """Peak bytes of CPU tensors allocated during ``step()`` above those alive before it, from
    the profiler's allocation events: what ``torch.cuda.max_memory_allocated`` measures on a
    GPU, without the C library's heap reuse that makes peak RSS vary between runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
    except (AttributeError, RuntimeError):
        return math.nan
    allocs = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag.name == "Allocation":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return float(peak)


# ------------------------------------------------------------------------------ the worker
def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this (fresh) process; returns the raw numbers."""
    import gc

    import torch

    mode = spec["mode"]
    case = Case(**spec["case"])
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    gen = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    is_cuda = device.type == "cuda"

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    if mode == "check":
        return _check_equivalence(case, device, gen)

    module = build_module(case).to(device).train()
    shape = (case.batch, case.channels, case.height, case.width)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
    gout = torch.randn((case.batch, case.out_channels, case.height, case.width), generator=gen)
    gout = gout.to(device)

    def step(inp: torch.Tensor, grad: torch.Tensor | None) -> tuple[float, float]:
        inp.grad = None
        module.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = module(inp)
        sync()
        t1 = time.perf_counter()
        if grad is None:
            grad = torch.ones_like(out)
        if out.shape != grad.shape:
            raise RuntimeError(
                f"{case.name}: output {tuple(out.shape)}, expected {tuple(grad.shape)}"
            )
        out.backward(grad)
        sync()
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    # Tiny warm-up: starts thread pools and initialises kernels without large allocations.
    tiny = torch.randn((2, case.channels, 12, 12), generator=gen).to(device).requires_grad_(True)
    step(tiny, None)
    del tiny
    module.zero_grad(set_to_none=True)
    gc.collect()
    sync()

    # ---- memory: the first full-size step of this process
    mem: dict[str, Any] = {}
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        f_ms, b_ms = step(x, gout)
        peak = torch.cuda.max_memory_allocated(device)
        mem = {"method": "cuda max_memory_allocated", "reliable": True,
               "baseline": float(base), "peak": float(peak)}
    elif _reset_peak_rss():
        base = _proc_status_bytes("VmRSS")
        f_ms, b_ms = step(x, gout)
        peak = _proc_status_bytes("VmHWM")
        mem = {"method": "VmHWM after clear_refs reset", "reliable": True,
               "baseline": base, "peak": peak}
    else:
        base = _proc_status_bytes("VmRSS")
        if math.isnan(base):
            base = _maxrss_bytes()
        before = _maxrss_bytes()
        f_ms, b_ms = step(x, gout)
        peak = _maxrss_bytes()
        mem = {"method": "ru_maxrss", "reliable": peak > before, "baseline": base, "peak": peak}
    first_ms = f_ms + b_ms

    # ---- time
    # One warm-up step, unless the memory step was already long (multi-second steps are not
    # dominated by one-time effects, and the run must stay within its time budget).
    per_step_s = first_ms / 1e3
    if per_step_s < spec["case_budget"] / 4:
        warm_f, warm_b = step(x, gout)
        per_step_s = (warm_f + warm_b) / 1e3
    repeats = max(3, min(spec["repeats"], int(spec["case_budget"] / max(per_step_s, 1e-6))))
    fwd, bwd = [], []
    for _ in range(repeats):
        f_ms, b_ms = step(x, gout)
        fwd.append(f_ms)
        bwd.append(b_ms)

    tensor_peak = math.nan if is_cuda else _tensor_peak_bytes(lambda: step(x, gout))
    result = {
        "tensor_peak_bytes": tensor_peak,
        "repeats": repeats,
        "fwd_ms": fwd,
        "bwd_ms": bwd,
        "times_ms": [f + b for f, b in zip(fwd, bwd)],
        "first_step_ms": first_ms,
        "peak_growth_bytes": mem["peak"] - mem["baseline"],
        "peak_abs_bytes": mem["peak"],
        "baseline_bytes": mem["baseline"],
        "memory_method": mem["method"],
        "memory_reliable": mem["reliable"],
    }
    if spec.get("profile_path"):
        result["profile_path"] = _profile(module, x, gout, case, spec["profile_path"], is_cuda)
    return result


def _profile(
    module: nn.Module, x: torch.Tensor, gout: torch.Tensor, case: Case, path: str, is_cuda: bool
) -> str:
    """torch.profiler table (self time and memory per op) for two steps, written to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda else [])
    with profile(activities=acts, profile_memory=True, record_shapes=False) as prof:
        for _ in range(2):
            x.grad = None
            module.zero_grad(set_to_none=True)
            with record_function("## forward"):
                out = module(x)
            with record_function("## backward"):
                out.backward(gout)
            if is_cuda:
                torch.cuda.synchronize()
    sort = "self_cuda_time_total" if is_cuda else "self_cpu_time_total"
    lines = [
        f"# {case.name} at {case.shape}: torch.profiler over 2 forward+backward steps",
        "# '## forward' / '## backward' rows are the two phases (totals include children).",
        "",
        prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60),
        "",
        "# by self CPU memory",
        prof.key_averages().table(
            sort_by="self_cpu_memory_usage", row_limit=15, max_name_column_width=60
        ),
    ]
    Path(path).write_text("\n".join(lines))
    return path


def _check_equivalence(
    case: Case, device: torch.device, gen: torch.Generator
) -> dict[str, Any]:
    """Conv2dNN (all, cosine) vs the straightforward formulation with the same weights."""
    import torch

    ref = make_straightforward(case.channels, case.out_channels, case.K).to(device)
    import convnn

    layer = convnn.Conv2dNN(
        case.channels, case.out_channels, K=case.K, sampling_type="all",
        magnitude_type=case.magnitude_type,
    ).to(device)
    with torch.no_grad():
        layer.weight.copy_(ref.conv.weight)
        layer.bias.copy_(ref.conv.bias)
    shape = (case.batch, case.channels, case.height, case.width)
    x = torch.randn(shape, generator=gen).to(device)
    gout = torch.randn((case.batch, case.out_channels, case.height, case.width), generator=gen)
    gout = gout.to(device)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y_ref = ref(x1)
    y = layer(x2)
    y_ref.backward(gout)
    y.backward(gout)
    diff = (y - y_ref).abs()
    return {
        "max_abs_diff_output": diff.max().item(),
        "max_abs_output": y_ref.abs().max().item(),
        "frac_outputs_off_1e-4": (diff > 1e-4).float().mean().item(),
        "max_abs_diff_grad_input": (x1.grad - x2.grad).abs().max().item(),
        "max_abs_diff_grad_weight": (ref.conv.weight.grad - layer.weight.grad).abs().max().item(),
        "max_abs_diff_grad_bias": (ref.conv.bias.grad - layer.bias.grad).abs().max().item(),
    }


# ------------------------------------------------------------------------------ the parent
def _spawn(
    spec: dict[str, Any], timeout: float, script: Path | None = None
) -> tuple[dict[str, Any] | None, str, float]:
    """Run ``script --worker SPEC`` (default: this file) in a fresh interpreter; (result or None,
    error text, wall seconds). ``bench_models.py`` shares it."""
    script = Path(__file__).resolve() if script is None else script
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO)
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):]), "", wall
    if proc.returncode in (-9, 137):
        err = "killed (SIGKILL; most likely out of memory)"
    else:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-3:]
        err = f"exit code {proc.returncode}: " + " | ".join(tail)
    return None, err, wall


def _mem_total_available() -> tuple[float, float]:
    """(MemTotal, MemAvailable) of the machine in bytes (NaN where unknown)."""
    vals = {"MemTotal": math.nan, "MemAvailable": math.nan}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key = line.split(":")[0]
                if key in vals:
                    vals[key] = float(line.split()[1]) * 1024
    except OSError:
        pass
    return vals["MemTotal"], vals["MemAvailable"]


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


#: CPU flags of native bf16 matmul kernels; without them bf16 autocast is emulated.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_bf16_flags() -> list[str]:
    """This CPU's native bf16 flags (empty: bf16 matmuls are emulated, ~45x slower than fp32
    for a VGG11 step on an AVX2-only EPYC)."""
    return sorted(set(_cpuinfo().get("flags", "").split()) & NATIVE_BF16_FLAGS)


def _cpu_model() -> str:
    """CPU name, family/model and the instruction sets that decide the kernels' speed: hosts
    sold under one name differ, so two reports are comparable only when this line matches."""
    import torch

    fields = _cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine()
    bf16 = cpu_bf16_flags()
    parts = [
        f"family {fields['cpu family']} model {fields['model']}" if "model" in fields else "",
        f"ATen CPU kernels {torch.backends.cpu.get_cpu_capability()}",
        f"native bf16: {', '.join(bf16)}" if bf16 else "no native bf16",
    ]
    return f"{name} ({'; '.join(p for p in parts if p)})"


def _git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "convnn"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        return rev + (" (+ uncommitted changes in convnn/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    total, avail = _mem_total_available()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": total / GIB,
        "mem_available_gib_at_start": avail / GIB,
        "torch": torch.__version__,
        "torch_threads": args.threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": args.device,
        "git": _git_rev(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(args.device))
        info["gpu"] = props.name
        info["gpu_mem_gib"] = props.total_memory / GIB
    return info


def _parse_sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def _parse_batches(text: str) -> dict[int, int]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        size, batch = item.split(":")
        out[int(size)] = int(batch)
    return out


def build_cases(args: argparse.Namespace, mem_total: float) -> list[Case]:
    """The case list for the requested sizes, layers and sampling types."""
    cases: list[Case] = []
    for size in args.sizes:
        batch = args.batch_at.get(size, args.batch)
        common = {"channels": args.channels, "out_channels": args.channels,
                  "height": size, "width": size, "K": args.K}
        for kind in args.layers:
            if kind in PLAIN_KINDS:
                cases.append(Case(kind=kind, batch=batch, **common))
                full = Case(kind=kind, batch=args.batch, **common)
                if kind == "straightforward" and batch != args.batch and \
                        straightforward_bytes(full)[0] > mem_total:
                    # the batch was reduced because the dense baseline cannot run at the full
                    # batch: list it as skipped with the memory it would need
                    cases.append(full)
                continue
            for sampling in args.samplings:
                m = {"all": -1, "random": args.num_random, "spatial": args.num_spatial}[sampling]
                cases.append(Case(kind=kind, batch=batch, sampling=sampling, num_samples=m,
                                  **common))
    return cases


def _skip_reason(case: Case, args: argparse.Namespace, mem_total: float) -> tuple[str, float]:
    """Why the dense baseline cannot run here ('' if it can), and the bytes it would need."""
    if case.kind != "straightforward":
        return "", math.nan
    scores, total = straightforward_bytes(case)
    if scores > mem_total:
        return (f"score matrix alone needs {scores / GIB:.1f} GiB "
                f"(machine has {mem_total / GIB:.1f} GiB)"), total
    if total > args.mem_limit_gib * GIB:
        return (f"needs ≈{total / GIB:.1f} GiB (scores {scores / GIB:.1f} GiB), over "
                f"--mem-limit-gib {args.mem_limit_gib:.1f}"), total
    return "", total


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run every case and the equivalence check; return the JSON-able report."""
    machine = _machine(args)
    if args.device.startswith("cuda"):
        mem_total = machine.get("gpu_mem_gib", 0.0) * GIB
    else:
        mem_total = machine["mem_total_gib"] * GIB
    if args.mem_limit_gib is None:
        avail = machine["mem_available_gib_at_start"] if not args.device.startswith("cuda") \
            else machine.get("gpu_mem_gib", 0.0)
        args.mem_limit_gib = 0.6 * avail
    base_spec = {"device": args.device, "threads": args.threads, "seed": args.seed,
                 "repeats": args.repeats, "case_budget": args.case_budget}
    results: list[Result] = []
    cases = build_cases(args, mem_total)
    print(f"{len(cases)} cases on {args.device}, {args.threads} threads; "
          f"writing to {args.out}", flush=True)
    out_dir = Path(args.out)
    for i, case in enumerate(cases, 1):
        res = Result(case=case)
        reason, needed = _skip_reason(case, args, mem_total)
        res.needed_bytes = needed
        if reason:
            res.status, res.reason = "skipped", reason
        else:
            spec = dict(base_spec, mode="bench", case=asdict(case))
            if args.profile and case.kind in ("convnn", "attention", "straightforward"):
                slug = f"{case.kind}_{case.sampling}_{case.height}x{case.width}_B{case.batch}"
                spec["profile_path"] = str(out_dir / f"profile_{slug}.txt")
            raw, err, wall = _spawn(spec, args.case_timeout)
            res.wall_s = wall
            if raw is None:
                res.status, res.reason = "failed", err
            else:
                for key, value in raw.items():
                    if hasattr(res, key):
                        setattr(res, key, value)
        res.loadavg_1min = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        results.append(res)
        _print_progress(i, len(cases), res)

    check = None
    if not args.no_check and "convnn" in args.layers:
        size = args.check_size
        ccase = Case(kind="convnn", batch=args.batch_at.get(size, args.batch),
                     channels=args.channels, out_channels=args.channels, height=size, width=size,
                     K=args.K)
        raw, err, _ = _spawn(dict(base_spec, mode="check", case=asdict(ccase)), args.case_timeout)
        check = {"shape": ccase.shape, **(raw if raw is not None else {"error": err})}
        print(f"equivalence check at {ccase.shape}: {check}", flush=True)

    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "command": _command_line(),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker",)},
        "results": [dict(asdict(r), name=r.case.name, shape=r.case.shape) for r in results],
        "equivalence": check,
        "_results": results,
    }


def _command_line() -> str:
    argv = [a for a in sys.argv]
    argv[0] = os.path.relpath(Path(argv[0]).resolve(), Path.cwd()) if argv else "bench_layers.py"
    return "python " + shlex.join(argv)


def _print_progress(i: int, n: int, res: Result) -> None:
    head = f"[{i:>2}/{n}] {res.case.name:<34} {res.case.shape:<24}"
    if res.status != "ok":
        print(f"{head} {res.status}: {res.reason}", flush=True)
        return
    print(f"{head} {res.median():9.1f} ms  {res.peak_growth_bytes / MIB:8.1f} MiB  "
          f"(n={res.repeats}, {res.wall_s:.0f} s)", flush=True)


# ---------------------------------------------------------------------------- reporting
def _fmt_ms(v: float) -> str:
    if math.isnan(v):
        return "–"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _fmt_ratio(v: float) -> str:
    return "–" if math.isnan(v) or math.isinf(v) else f"{v:.2f}×"


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (math.nan, math.nan)
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _find(results: list[Result], kind: str, sampling: str = "all", **shape: int) -> Result | None:
    """The measured result of ``kind`` (and ``sampling``) whose case matches ``shape``."""
    for r in results:
        c = r.case
        if r.status != "ok" or c.kind != kind:
            continue
        if kind in ("convnn", "attention") and c.sampling != sampling:
            continue
        if all(getattr(c, k) == v for k, v in shape.items()):
            return r
    return None


def _verdicts(results: list[Result]) -> list[str]:
    """Target lines: at R ≥ 2.5× faster and ≥ 4× less peak memory than the dense
    baseline; Conv2dNN at 128×128 with B = 8 within 4 GiB."""
    lines = []
    ref = {"batch": 32, "channels": 64, "out_channels": 64, "height": 32, "width": 32, "K": 9}
    nn_r, sf_r = _find(results, "convnn", **ref), _find(results, "straightforward", **ref)
    if nn_r and sf_r:
        speed = _div(sf_r.median(), nn_r.median())
        memr = _div(sf_r.peak_growth_bytes, nn_r.peak_growth_bytes)
        lines.append(
            f"- Conv2dNN all vs straightforward at R (B32 C64→64 32×32 K9, cosine): "
            f"**{speed:.2f}× faster** (target ≥ 2.5×: {'met' if speed >= 2.5 else 'NOT met'}), "
            f"**{memr:.2f}× less peak memory** "
            f"(target ≥ 4×: {'met' if memr >= 4 else 'NOT met'})."
        )
    else:
        lines.append("- Reference shape R: not measured in this run (needs --sizes 32, batch 32, "
                     "K 9, C 64 with the convnn and straightforward layers).")
    att_r = _find(results, "attention", **ref)
    if nn_r and att_r:
        time_r = _div(att_r.median(), nn_r.median())
        mem_r = _div(att_r.peak_growth_bytes, nn_r.peak_growth_bytes)
        tens_r = _div(att_r.tensor_peak_bytes, nn_r.tensor_peak_bytes)
        lines.append(
            f"- Conv2dNNAttention all vs Conv2dNN all at R: **{time_r:.2f}× the time** (target "
            f"≤ 1.3×: {'met' if time_r <= 1.3 else 'NOT met'}), **{mem_r:.2f}× the peak "
            f"memory** (target ≤ 1.5×: {'met' if mem_r <= 1.5 else 'NOT met'})"
            + (
                ""
                if math.isnan(tens_r)
                else f"; peak of live tensors {att_r.tensor_peak_bytes / MIB:.1f} vs "
                f"{nn_r.tensor_peak_bytes / MIB:.1f} MiB = **{tens_r:.2f}×**"
            )
            + "."
        )
    big = _find(results, "convnn", batch=8, height=128, width=128)
    if big:
        ok = big.peak_growth_bytes <= 4 * GIB
        lines.append(
            f"- Conv2dNN all at 128×128, B = 8: peak growth "
            f"**{big.peak_growth_bytes / GIB:.2f} GiB** (absolute process peak "
            f"{big.peak_abs_bytes / GIB:.2f} GiB), {_fmt_ms(big.median())} ms per step — "
            f"target ≤ 4 GiB: {'met' if ok else 'NOT met'}."
        )
    else:
        lines.append("- 128×128 B = 8: not measured in this run.")
    return lines


def _table_row(r: Result, sf: Result | None, conv: Result | None) -> str:
    """One markdown table row (13 columns)."""
    c = r.case
    if r.status != "ok":
        need = "" if math.isnan(r.needed_bytes) else f"; needs ≈{r.needed_bytes / GIB:.1f} GiB"
        return f"| {c.name} | {c.shape} | – | {r.status}: {r.reason}{need} |" + " |" * 9
    q1, q3 = _quartiles(r.times_ms)
    mem = r.peak_growth_bytes
    t = r.median()
    nan = math.nan
    cols = [
        c.name,
        c.shape,
        str(r.repeats),
        f"**{_fmt_ms(t)}**",
        f"{_fmt_ms(q1)}–{_fmt_ms(q3)}",
        f"{_fmt_ms(min(r.times_ms))}–{_fmt_ms(max(r.times_ms))}",
        f"{_fmt_ms(r.median('fwd_ms'))} / {_fmt_ms(r.median('bwd_ms'))}",
        f"{mem / MIB:.0f}" + ("" if r.memory_reliable else " (≥)"),
        "–" if math.isnan(r.tensor_peak_bytes) else f"{r.tensor_peak_bytes / MIB:.1f}",
        _fmt_ratio(_div(sf.median(), t) if sf else nan),
        _fmt_ratio(_div(sf.peak_growth_bytes, mem) if sf else nan),
        _fmt_ratio(_div(t, conv.median()) if conv else nan),
        _fmt_ratio(_div(mem, conv.peak_growth_bytes) if conv else nan),
    ]
    return "| " + " | ".join(cols) + " |"


def write_reports(report: dict[str, Any], args: argparse.Namespace) -> tuple[Path, Path]:
    """Write ``layers.md`` and ``layers.json`` into ``args.out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[Result] = report.pop("_results")
    m = report["machine"]
    md = [
        "# ConvNN layer benchmark: forward + backward time and peak memory",
        "",
        f"- Date: {report['date_utc']}",
        f"- Command: `{report['command']}`",
        f"- Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs "
        f"({m['cpus_usable']} usable), {m['mem_total_gib']:.1f} GiB RAM"
        + (f"; GPU {m['gpu']} ({m['gpu_mem_gib']:.0f} GiB)" if "gpu" in m else ""),
        f"- Software: torch {m['torch']}, Python {m['python']}, {m['platform']}; "
        f"device `{m['device']}`, torch threads {m['torch_threads']}; convnn at git {m['git']}",
        f"- Load average (1/5/15 min) at start {_fmt_load(m['loadavg_start'])}, at end "
        f"{_fmt_load(m['loadavg_end'])} — a load above the thread count means other work shared "
        "the CPUs and the times are noisy.",
        "- Every case runs in a fresh subprocess. Time: forward + backward "
        "(`out.backward(grad)` with a fixed random grad; input requires grad), median over n "
        "repeats after warm-up, with the inter-quartile range and min–max. Memory: "
        + _memory_note(results),
        "- Ratios: *speed-up* and *memory reduction* vs the straightforward dense formulation "
        "(all candidates) at the same shape (> 1 is better); *time / Conv2d* and *mem / Conv2d* "
        "vs a 3×3 `nn.Conv2d` at the same shape (1 = as cheap as a convolution).",
        "",
        "## Targets",
        "",
        *_verdicts(results),
        "",
    ]
    eq = report.get("equivalence")
    if eq is not None:
        md += ["## Equivalence with the straightforward formulation", ""]
        if "error" in eq:
            md.append(f"- at {eq['shape']}: could not run ({eq['error']})")
        else:
            md.append(
                f"- Conv2dNN(all, cosine) with the baseline's Conv1d weight and bias copied in, at "
                f"{eq['shape']}: max |Δ output| = {eq['max_abs_diff_output']:.3g} "
                f"(max |output| {eq['max_abs_output']:.3g}; fraction of outputs off by > 1e-4: "
                f"{eq['frac_outputs_off_1e-4']:.3g}); max |Δ grad| input "
                f"{eq['max_abs_diff_grad_input']:.3g}, weight {eq['max_abs_diff_grad_weight']:.3g},"
                f" bias {eq['max_abs_diff_grad_bias']:.3g}."
            )
        md.append("")
    groups: dict[tuple[int, ...], list[Result]] = {}
    for r in results:
        groups.setdefault((r.case.height, r.case.batch), []).append(r)
    md += ["## Results", ""]
    header = ("| case | shape | n | time median [ms] | IQR [ms] | min–max [ms] | fwd / bwd [ms] | "
              "peak mem [MiB] | peak tensors [MiB] | speed-up vs straightforward | "
              "mem. reduction vs straightforward | time / Conv2d | mem / Conv2d |")
    for (size, batch), rows in sorted(groups.items()):
        sf = next((r for r in rows if r.case.kind == "straightforward" and r.status == "ok"), None)
        conv = next((r for r in results if r.case.kind == "conv2d" and r.status == "ok"
                     and r.case.shape_key == rows[0].case.shape_key), None)
        md += [f"### {size}×{size}, batch {batch}", "", header, "|" + "---|" * 13]
        md += [_table_row(r, sf, conv) for r in rows]
        md.append("")
    md_path, json_path = out / "layers.md", out / "layers.json"
    md_path.write_text("\n".join(md))
    json_path.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    return md_path, json_path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _fmt_load(load: list[float] | None) -> str:
    return "n/a" if not load else "/".join(f"{v:.1f}" for v in load)


def _memory_note(results: list[Result]) -> str:
    methods = sorted({r.memory_method for r in results if r.status == "ok" and r.memory_method})
    if any("cuda" in m for m in methods):
        return ("peak `torch.cuda.max_memory_allocated` during the first full-size step minus the "
                "memory allocated before it (inputs and parameters excluded).")
    return ("peak RSS growth during the first full-size step of the process: RSS baseline after "
            "imports, module and input creation and a tiny warm-up call; peak = VmHWM after "
            f"resetting it at the baseline (method: {', '.join(methods) or 'n/a'}). "
            "'(≥)' marks a lower bound (peak could not be reset). *Peak tensors*: the "
            "peak bytes of live tensors during one more step (after the timed ones), from "
            "the profiler's allocation events, above what was alive before it (the input "
            "and the incoming gradient excluded): what `torch.cuda.max_memory_allocated` "
            "reports on a GPU, and stable between runs where RSS is not (heap reuse).")


# --------------------------------------------------------------------------------- the CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per case (at most)")
    p.add_argument("--case-budget", type=float, default=10.0,
                   help="seconds of timed steps per case; repeats are cut to fit (min 3)")
    p.add_argument("--sizes", default="16,32,64,128", help="square map sizes")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--batch-at", default="128:8", help="per-size batch overrides, size:batch,...")
    p.add_argument("--channels", type=int, default=64, help="C = O")
    p.add_argument("--K", type=int, default=9, help="neighbours")
    p.add_argument("--layers", default=",".join(LAYER_KINDS), help=f"subset of {LAYER_KINDS}")
    p.add_argument("--samplings", default=",".join(SAMPLINGS), help=f"subset of {SAMPLINGS}")
    p.add_argument("--num-random", type=int, default=64, help="M for sampling=random")
    p.add_argument("--num-spatial", type=int, default=8, help="n for sampling=spatial")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="skip dense baselines estimated above this (default: 60%% of the memory "
                   "available at start)")
    p.add_argument("--case-timeout", type=float, default=300.0, help="seconds per subprocess")
    p.add_argument("--check-size", type=int, default=32, help="map size of the equivalence check")
    p.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    p.add_argument("--profile", action="store_true",
                   help="also write torch.profiler tables (profile_*.txt) for the ConvNN cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 16×16, batch 8, 3 repeats (< 1 min)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output folder")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.batch_at = "16", 8, ""
        args.repeats, args.case_budget, args.check_size = 3, 2.0, 16
    args.sizes = _parse_sizes(args.sizes)
    args.batch_at = _parse_batches(args.batch_at)
    args.layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    args.samplings = [s.strip() for s in args.samplings.split(",") if s.strip()]
    bad = [s for s in args.layers if s not in LAYER_KINDS]
    bad += [s for s in args.samplings if s not in SAMPLINGS]
    if bad:
        p.error(f"unknown layer/sampling names {bad}; layers: {LAYER_KINDS}, samplings {SAMPLINGS}")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: worker mode (internal) or the full benchmark."""
    args = parse_args(argv)
    if args.worker is not None:
        result = _worker(json.loads(args.worker))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0
    t0 = time.perf_counter()
    report = run_all(args)
    report["total_wall_s"] = time.perf_counter() - t0
    md_path, json_path = write_reports(report, args)
    print()
    print(md_path.read_text())
    print(f"\nwrote {md_path} and {json_path} in {report['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
