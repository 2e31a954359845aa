#!/usr/bin/env python3
"""Run several mergekit recipes in one mergekit process (imports cost seconds per run).

    MERGEKIT_PYTHON tools/run_mergekit.py CASES.json RESULTS.json

CASES.json: [{"recipe": PATH, "out": FOLDER}, ...]. RESULTS.json gets, per case, "ok" or the
first line of mergekit's error. Run with an interpreter that has mergekit 0.1.5 (the
cross-check tests and bench/vs_mergekit.py find one: see tests/test_mergekit_crosscheck.py).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with open(argv[0]) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        with open(case["recipe"], encoding="utf-8") as f:
            text = f.read()
        try:
            config = MergeConfiguration.model_validate(yaml.safe_load(text))
            run_merge(
                config,
                case["out"],
                options=MergeOptions(quiet=True, random_seed=case.get("seed", 0)),
                config_source=text,
            )
            results.append("ok")
        except Exception as exc:  # recorded: the test compares what mergekit refuses with what we refuse
            results.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    with open(argv[1], "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
