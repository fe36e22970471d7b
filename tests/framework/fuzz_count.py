"""The long fuzz run done by hand: ``python -m tests.framework.fuzz_count N [SEED]`` draws N
configurations from the same domain as ``test_fuzz_config.py`` (uniformly, seeded) and reports
how many break the start-up invariant, with each failing draw (to keep as a regular case)."""

from __future__ import annotations

import json
import random
import sys
import tempfile
import traceback
from pathlib import Path

from .test_fuzz_config import PRESETS, VALUES, check, fuzz_keys


def main() -> None:
    """Draw, check, count; failing draws go to stdout as JSON lines."""
    n = int(sys.argv[1])
    rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    outcomes: dict[str, int] = {}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            preset = rng.randrange(len(PRESETS))
            keys = fuzz_keys(preset)
            chosen = rng.sample(keys, rng.randint(1, min(3, len(keys))))
            values = {k: rng.choice(VALUES[kind]) for k, kind in chosen}
            try:
                outcome = check(preset, values, Path(tmp) / "run")
            except AssertionError as err:
                outcome = "wrong key"
                failures.append({"preset": PRESETS[preset], "values": values, "why": str(err)})
            except Exception as err:  # the invariant's other half: no other exception
                outcome = f"exception {type(err).__name__}"
                last = traceback.format_exception(err)[-1].strip()
                failures.append({"preset": PRESETS[preset], "values": values, "why": last})
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if failures and failures[-1].get("i") is None and outcome not in (
                "pass", "compose", "refused"
            ):
                failures[-1]["i"] = i
                print(json.dumps(failures[-1]), flush=True)
    print(json.dumps({"draws": n, "outcomes": outcomes, "broken": len(failures)}), flush=True)


if __name__ == "__main__":
    main()
