"""Cold start and per-call cost of a tiny ConvNN layer against a tiny ``nn.Conv2d``.

Each measurement is a fresh Python process: ``import torch`` (not counted), then the layer's
imports, construction and first forward + backward (counted: wall time and RSS growth), then
the steady per-call time (median over many calls, forward only and forward + backward).
Writes ``cold_start.md`` and ``cold_start.json`` to ``--out``.

    python benchmarks/bench_cold_start.py                 # 7 processes per layer
    python benchmarks/bench_cold_start.py --repeats 3 --out /tmp/x
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadnote import load_note  # noqa: E402

LAYERS = ("conv2d", "convnn", "convnn_attn")
TARGET_EXTRA_S, TARGET_EXTRA_MIB, TARGET_CALL_MS = 0.25, 40.0, 0.3

CHILD = r"""
import json, sys, time
def rss():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024
import torch
torch.set_num_threads(1)
kind, calls = sys.argv[1], int(sys.argv[2])
r0, n0, t0 = rss(), len(sys.modules), time.perf_counter()
if kind == "conv2d":
    layer = torch.nn.Conv2d(4, 8, 3, padding=1)
else:
    import convnn
    cls = convnn.Conv2dNN if kind == "convnn" else convnn.Conv2dNNAttention
    layer = cls(4, 8, K=9, padding=1)
x = torch.randn(2, 4, 8, 8, requires_grad=True)
layer(x).sum().backward()
first, r1, n1 = time.perf_counter() - t0, rss(), len(sys.modules)
def per_call(step):
    times = []
    for _ in range(calls):
        t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
def fwd():
    with torch.no_grad():
        layer(x)
def fwd_bwd():
    layer(x).sum().backward()
per_call(fwd_bwd)  # warm-up
print(json.dumps({
    "first_s": first, "rss_mib": r1 - r0, "modules": n1 - n0,
    "dynamo": "torch._dynamo" in sys.modules,
    "fwd_ms": per_call(fwd) * 1e3, "fwd_bwd_ms": per_call(fwd_bwd) * 1e3,
}))
"""


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _run(kind: str, calls: int, root: Path = ROOT) -> dict:
    """One fresh process measuring ``kind`` with the ``convnn`` of the tree at ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(calls)],
        capture_output=True, text=True, check=True, env=env, cwd=root,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _export(rev: str) -> Path:
    """The tree of git revision ``rev`` in a temporary folder (``git archive``)."""
    dest = Path(tempfile.mkdtemp(prefix="cold_start_"))
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (also checked by the README tests)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="processes per layer")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per process")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--against",
        default=None,
        metavar="REV",
        help="also measure the tiny Conv2dNN of git revision REV, interleaved (a baseline row)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the processes (layers interleaved, so load drifts hit each alike) and write results."""
    args = parse_args(argv)
    load_before, started = _load(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    trees = {kind: (kind, ROOT) for kind in LAYERS}
    if args.against:
        trees[f"convnn at {args.against}"] = ("convnn", _export(args.against))
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(args.repeats):
        for name, (kind, root) in trees.items():
            runs[name].append(_run(kind, args.calls, root))
    load_after = _load()
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("first_s", "rss_mib", "modules")}
        | {m: statistics.median(r[m] for r in v) for m in ("fwd_ms", "fwd_bwd_ms")}
        | {"dynamo": any(r["dynamo"] for r in v)}
        for k, v in runs.items()
    }
    base = med["conv2d"]
    import torch

    lines = [
        "# Cold start and per-call cost of a tiny layer",
        "",
        f"- command: `python benchmarks/bench_cold_start.py --repeats {args.repeats} "
        f"--calls {args.calls}" + (f" --against {args.against}" if args.against else "") + "`",
        f"- date: {started}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; torch {torch.__version__}; 1 thread per process",
        f"- load average (1/5/15 min) before: {load_before}; after: {load_after} "
        f"({load_note(load_before, load_after)})",
        "- layer: (2, 4, 8, 8) input, 4 → 8 channels; ConvNN layers K = 9, padding 1; "
        "nn.Conv2d 3×3, padding 1",
        f"- extra = `import convnn` + construction + first forward/backward, over the same "
        f"with `nn.Conv2d` after `import torch` (targets ≤ {TARGET_EXTRA_S} s, "
        f"≤ {TARGET_EXTRA_MIB:.0f} MiB); per call: median of {args.calls} calls "
        f"(target ≤ {TARGET_CALL_MS} ms)",
        f"- medians over {args.repeats} fresh processes per layer",
        "",
        "| layer | first step (s) | extra (s) | RSS growth (MiB) | extra (MiB) | modules loaded "
        "| torch._dynamo loaded | forward (ms) | forward+backward (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, m in med.items():
        lines.append(
            f"| {kind} | {m['first_s']:.3f} | {m['first_s'] - base['first_s']:+.3f} "
            f"| {m['rss_mib']:.1f} | {m['rss_mib'] - base['rss_mib']:+.1f} | {m['modules']:.0f} "
            f"| {'yes' if m['dynamo'] else 'no'} | {m['fwd_ms']:.3f} | {m['fwd_bwd_ms']:.3f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cold_start.md").write_text("\n".join(lines) + "\n")
    (args.out / "cold_start.json").write_text(
        json.dumps({"load_before": load_before, "load_after": load_after, "runs": runs}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
