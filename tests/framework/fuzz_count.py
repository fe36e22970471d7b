"""The long fuzz run done by hand: ``python -m tests.framework.fuzz_count N [SEED [START]]``
draws configurations ``START..N-1`` from the same domain as ``test_fuzz_config.py`` (draw ``i``
from its own seeded generator, so a run can continue after a crash) and prints one JSON line per
draw that breaks the start-up invariant, then the counts. A line ``{"at": i}`` precedes each
draw: when the interpreter itself dies (a crash, the kernel's OOM killer), the last one names
the draw, and the run goes on with ``START=i+1``."""

from __future__ import annotations

import json
import random
import sys
import tempfile
import traceback
from pathlib import Path

from .test_fuzz_config import PRESETS, VALUES, check, fuzz_keys


def draw(seed: int, i: int) -> tuple[int, dict[str, str]]:
    """Draw ``i`` of the run with ``seed``: a preset and one to three keys with values."""
    rng = random.Random(f"{seed}-{i}")
    preset = rng.randrange(len(PRESETS))
    keys = fuzz_keys(preset)
    chosen = rng.sample(keys, rng.randint(1, min(3, len(keys))))
    return preset, {k: rng.choice(VALUES[kind]) for k, kind in chosen}


def main() -> None:
    """Draw, check, count."""
    n = int(sys.argv[1])
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    start = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    outcomes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(start, n):
            preset, values = draw(seed, i)
            print(json.dumps({"at": i}), flush=True)
            failure = None
            try:
                outcome = check(preset, values, Path(tmp) / "run")
            except AssertionError as err:
                outcome, failure = "wrong key", str(err)
            except Exception as err:  # the invariant's other half: no other exception
                outcome = f"exception {type(err).__name__}"
                failure = traceback.format_exception(err)[-1].strip()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if failure is not None:
                row = {"i": i, "preset": PRESETS[preset], "values": values, "why": failure}
                print(json.dumps(row), flush=True)
    print(json.dumps({"draws": n - start, "outcomes": outcomes}), flush=True)


if __name__ == "__main__":
    main()
