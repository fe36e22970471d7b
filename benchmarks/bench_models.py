"""Whole-network training-step cost: VGG11, ResNet18 and ViT-Tiny with each layer option.

One case = one backbone built with ``models.layer_factory.LayerFactory(layer, ...)``, trained
for a few steps with AdamW on random CIFAR-shaped data (batch 64, 3×32×32, 10 classes), in
fp32 or under bf16 autocast. A step is forward + cross-entropy + backward + ``optimizer.step()``.

Every case runs in a **fresh subprocess**:

* CPU memory: after imports, model and optimizer creation and a warm-up step at batch 2 (which
  creates the AdamW state and the thread pools) the process's peak-RSS mark is reset
  (``/proc/self/clear_refs`` ← 5) and the current RSS is the baseline; the first full-batch
  step follows and its peak growth is ``VmHWM − baseline`` (activations, gradients and
  temporaries; parameters and optimizer state are in the baseline).
* CUDA memory: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  what was allocated at the baseline.
* Time: the memory step doubles as the full-size warm-up; then ``--repeats`` timed steps (cut
  to ``--case-budget`` seconds, at least 2), synchronised on CUDA; median and inter-quartile
  range over all rounds.
* Rounds (``--rounds R``): the whole case list runs R times, round-robin, so a drift of the
  machine's speed (this 2-core VM varies by ±20 % over minutes) hits every case alike; the
  ratio to ``conv`` is the median over rounds of the per-round ratio of medians.

ConvNN layers use ``padding=1`` (the original default) and the library defaults otherwise
(K = 9, cosine for ``convnn``/``branching``, matmul for ``convnn_attn``, sampling ``all``).
ViT-Tiny uses 3 heads for the attention-type mixers.

Usage::

    python benchmarks/bench_models.py                          # CPU, all models (bf16: below)
    python benchmarks/bench_models.py --quick --out /tmp/x      # smoke run
    python benchmarks/bench_models.py --models vgg11 --layers conv,convnn --rounds 5
    python benchmarks/bench_models.py --device cuda --repeats 20

bf16 runs by default only where autocast has native bf16 kernels (CUDA, or a CPU with
AVX-512 BF16 / AMX); ``--precisions fp32,bf16`` forces it. Results: ``<out>/models.md`` and
``<out>/models.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # models/ runs from the checkout

from bench_layers import (
    MIB,
    REPO,
    RESULT_MARK,
    _command_line,
    _fmt_ms,
    _machine,
    _proc_status_bytes,
    _quartiles,
    _reset_peak_rss,
    _spawn,
    cpu_bf16_flags,
)

MODELS = ("vgg11", "resnet18", "vit_tiny")
LAYERS = ("conv", "convnn", "convnn_attn", "branching", "attention")
PRECISIONS = ("fp32", "bf16")
CONVNN_LAYERS = ("convnn", "convnn_attn", "branching")
TOKEN_LAYERS = ("conv", "convnn", "convnn_attn", "attention")  # what fits a transformer


def default_vgg_head() -> str:
    """The original 7×7-pool → 4096 → 4096 head: ``original`` where the backbone has it, else
    its older name ``imagenet``."""
    from models.vgg import HEADS

    return "original" if "original" in HEADS else "imagenet"


def build_model(model: str, layer: str, vgg_head: str):
    """Backbone ``model`` with every replaceable layer built by ``LayerFactory(layer)``."""
    from models.layer_factory import LayerFactory

    options: dict[str, Any] = {}
    if layer in CONVNN_LAYERS:
        options["padding"] = 1
    if model == "vit_tiny" and layer in ("attention", "convnn_attn"):
        options["num_heads"] = 3
    factory = LayerFactory(layer, sampling={"sampling_type": "all"}, **options)
    if model == "vgg11":
        from models.vgg import VGG

        return VGG(factory, num_classes=10, image_size=32, depth=11, head=vgg_head)
    if model == "resnet18":
        from models.resnet import ResNet

        return ResNet(factory, num_classes=10, image_size=32, depth=18)
    from models.vit import ViT

    return ViT(factory, num_classes=10, image_size=32, patch_size=4, dim=192, depth=12)


def fits(model: str, layer: str) -> bool:
    """Whether ``layer`` has a role in ``model`` (branching is 2-D only)."""
    return layer in TOKEN_LAYERS if model == "vit_tiny" else True


# ------------------------------------------------------------------------------ the worker
def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this (fresh) process; returns the raw numbers."""
    import gc

    import torch
    import torch.nn.functional as F

    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    is_cuda = device.type == "cuda"
    net = build_model(spec["model"], spec["layer"], spec["vgg_head"]).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    params = sum(p.numel() for p in net.parameters())
    bf16 = spec["precision"] == "bf16"

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 3, 32, 32, device=device)
        return x, torch.randint(0, 10, (n,), device=device)

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        sync()
        return (time.perf_counter() - t0) * 1e3

    step(*batch(2))  # AdamW state, thread pools, lazy kernels
    full = batch(spec["batch"])
    gc.collect()
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        first = step(*full)
        peak, method = torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    else:
        reset = _reset_peak_rss()
        base = _proc_status_bytes("VmRSS")
        first = step(*full)
        peak = _proc_status_bytes("VmHWM") - base
        method = "VmHWM after clear_refs reset" if reset else "VmHWM (no reset: ≥)"
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < spec["repeats"]:
        times.append(step(*full))
        spent = time.perf_counter() - t_start
        if len(times) >= 2 and spent + spent / len(times) > spec["case_budget"]:
            break
    return {
        "times_ms": times,
        "first_step_ms": first,
        "peak_growth_bytes": peak,
        "memory_method": method,
        "params": params,
        "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------- driver
def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run every case and collect the report."""
    machine = _machine(args)
    started = dt.datetime.now(dt.timezone.utc)
    cases = [
        (m, layer, prec)
        for m in args.models
        for prec in args.precisions
        for layer in args.layers
        if fits(m, layer)
    ]
    results = [
        {"model": m, "layer": layer, "precision": prec, "status": "ok", "rounds": []}
        for m, layer, prec in cases
    ]
    total = len(cases) * args.rounds
    done = 0
    # Round-robin: every case once per round, so a slow drift of the machine's speed hits all
    # cases alike and the per-round ratios to conv stay fair.
    for rnd in range(1, args.rounds + 1):
        for res in results:
            done += 1
            model, layer, prec = res["model"], res["layer"], res["precision"]
            if res["status"] != "ok":
                continue
            spec = {
                "model": model,
                "layer": layer,
                "precision": prec,
                "device": args.device,
                "threads": args.threads,
                "batch": args.batch,
                "repeats": args.repeats,
                "case_budget": args.case_budget,
                "vgg_head": args.vgg_head,
                "seed": 0,
            }
            raw, err, wall = _spawn(spec, args.case_timeout, Path(__file__).resolve())
            head = f"[{done:>2}/{total}] round {rnd} {model:<9} {layer:<12} {prec}:"
            if raw is None:
                res.update(status="failed", reason=err)
                print(f"{head} {err}", flush=True)
                continue
            raw["wall_s"] = wall
            res["rounds"].append(raw)
            print(
                f"{head} {statistics.median(raw['times_ms']):8.0f} ms  "
                f"{raw['peak_growth_bytes'] / MIB:8.0f} MiB  (n={len(raw['times_ms'])}, "
                f"{wall:.0f} s)",
                flush=True,
            )
    for res in results:
        rounds = res.pop("rounds")
        if res["status"] != "ok":
            continue
        res.update(
            times_ms=[t for r in rounds for t in r["times_ms"]],
            round_medians_ms=[statistics.median(r["times_ms"]) for r in rounds],
            peak_growth_bytes=statistics.median(r["peak_growth_bytes"] for r in rounds),
            params=rounds[0]["params"],
            memory_method=rounds[0]["memory_method"],
            first_step_ms=[r["first_step_ms"] for r in rounds],
            wall_s=sum(r["wall_s"] for r in rounds),
        )
    machine["loadavg_end"] = list(os.getloadavg())
    return {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": _command_line(),
        "machine": machine,
        "settings": {
            "batch": args.batch,
            "image": "3×32×32",
            "classes": 10,
            "optimizer": "AdamW(lr=1e-3)",
            "vgg_head": args.vgg_head,
            "convnn_padding": 1,
            "rounds": args.rounds,
        },
        "results": results,
    }


def _ratio_note(results: list[dict[str, Any]], model: str, prec: str) -> dict[str, float]:
    """Step time of each layer over the ``conv`` one (same model, precision): the median over
    rounds of the per-round ratio of medians (paired, so machine drift between rounds cancels)."""
    rounds = {
        r["layer"]: r["round_medians_ms"]
        for r in results
        if r["model"] == model and r["precision"] == prec and r["status"] == "ok"
    }
    conv = rounds.get("conv")
    if not conv:
        return {}
    return {
        k: statistics.median(a / b for a, b in zip(v, conv, strict=False))
        for k, v in rounds.items()
    }


def write_reports(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``models.md`` (tables) and ``models.json`` (raw numbers) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    js = out / "models.json"
    js.write_text(json.dumps(report, indent=1, default=str))
    m = report["machine"]
    s = report["settings"]
    load0 = "/".join(f"{v:.1f}" for v in m["loadavg_start"])
    load1 = "/".join(f"{v:.1f}" for v in m["loadavg_end"])
    lines = [
        "# Whole-network training step: time and peak memory",
        "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}`",
        f"- Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs "
        f"({m['cpus_usable']} usable), {m['mem_total_gib']:.1f} GiB RAM"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        f"- Software: torch {m['torch']}, Python {m['python']}, {m['platform']}; device "
        f"`{m['device']}`, torch threads {m['torch_threads']}; convnn at git {m['git']}",
        f"- Load average (1/5/15 min) at start {load0}, at end {load1} — a load above the thread "
        "count means other work shared the CPUs and the times are noisy.",
        f"- Step: forward + cross-entropy + backward + AdamW step, batch {s['batch']}, "
        f"{s['image']} random input, {s['classes']} classes; VGG11 head `{s['vgg_head']}` "
        "(7×7 pool → 4096 → 4096); ConvNN layers with padding 1. Fresh subprocess per case "
        f"and round ({s['rounds']} round(s), every case once per round); time = median (IQR) of "
        "all timed steps after a warm-up; time / conv = median over rounds of the per-round "
        "ratio; memory = median over rounds of the peak growth of the first full step over "
        "the state after a batch-2 warm-up step (see the script's docstring).",
        "",
    ]
    results = report["results"]
    for model in MODELS:
        rows = [r for r in results if r["model"] == model]
        if not rows:
            continue
        lines += [
            f"## {model}",
            "",
            "| layer | precision | n | step median [ms] | IQR [ms] | peak mem [MiB] | "
            "time / conv |",
            "|---|---|---|---|---|---|---|",
        ]
        for prec in PRECISIONS:
            ratios = _ratio_note(results, model, prec)
            for r in (x for x in rows if x["precision"] == prec):
                if r["status"] != "ok":
                    lines.append(f"| {r['layer']} | {prec} | – | {r['reason']} | | | |")
                    continue
                q1, q3 = _quartiles(r["times_ms"])
                ratio = ratios.get(r["layer"], math.nan)
                lines.append(
                    f"| {r['layer']} | {prec} | {len(r['times_ms'])} | "
                    f"**{_fmt_ms(statistics.median(r['times_ms']))}** | "
                    f"{_fmt_ms(q1)}–{_fmt_ms(q3)} | {r['peak_growth_bytes'] / MIB:.0f} | "
                    f"{'–' if math.isnan(ratio) else f'{ratio:.2f}×'} |"
                )
        lines.append("")
    md = out / "models.md"
    md.write_text("\n".join(lines))
    return md, js


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument(
        "--precisions",
        default="auto",
        help="fp32,bf16; auto: fp32, and bf16 where the device has native bf16 kernels",
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case, at most")
    p.add_argument("--case-budget", type=float, default=20.0, help="seconds of timed steps")
    p.add_argument("--case-timeout", type=float, default=600.0)
    p.add_argument("--rounds", type=int, default=1, help="run every case this many times")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--vgg-head", default=None, help="default: original (or imagenet)")
    p.add_argument("--quick", action="store_true", help="batch 8, 2 repeats, VGG11 conv/convnn")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.models, args.layers = 8, 2, "vgg11", "conv,convnn"
    if args.precisions == "auto":
        args.precisions = ",".join(auto_precisions(args.device))
    for key, valid in (("models", MODELS), ("layers", LAYERS), ("precisions", PRECISIONS)):
        values = [v.strip() for v in getattr(args, key).split(",") if v.strip()]
        bad = [v for v in values if v not in valid]
        if bad or not values:
            p.error(f"--{key}={getattr(args, key)!r}: {bad or 'empty'}; choose from {valid}")
        setattr(args, key, values)
    return args


def auto_precisions(device: str) -> list[str]:
    """fp32, plus bf16 where autocast has native bf16 kernels: a CUDA device that supports it,
    or a CPU with AVX-512 BF16 / AMX (elsewhere bf16 is emulated and a VGG11 step takes ~90 s)."""
    if device.startswith("cuda"):
        import torch

        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        native = bool(cpu_bf16_flags())
    if not native:
        print(f"bf16 skipped: no native bf16 kernels on {device} (--precisions fp32,bf16 runs it)")
    return ["fp32", "bf16"] if native else ["fp32"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.vgg_head is None:
        args.vgg_head = default_vgg_head()
    report = run_all(args)
    md, js = write_reports(report, Path(args.out))
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
