"""The kill/resume tests, again and again: how often does a killed run lose or double a row?

    make soak N=10                       # or: .venv/bin/python scripts/soak.py --runs 10

One pass of a test that kills at random moments is weak evidence (the Ray kill tests once lost rows in about one run
of five). Each run here is one pytest session, as `make test` runs the suite (two processes, a test file each), of:
  - tests/test_create_data.py::test_kills_at_random_moments_then_resume (stage 1, SIGKILLed mid-stream, resumed)
  - tests/test_ray_stage.py::test_replica_killed_mid_run_is_retried_by_ray
  - tests/test_ray_stage.py::test_driver_killed_or_stopped_then_resumed_by_id
Each test writes its figures to the file in SOAK_REPORT at every check (tests/test_create_data.py check_survivors):
rows lost (finished before a kill and gone or changed after it, or a selected id missing at the end) and rows
duplicated. This prints, per run and test, the figures at its last check and whether it passed, then the totals;
it exits 1 if any row was lost or doubled or any test failed. Logs go to --log_dir (default data/soak/).
A run took 146-200 s on the 2-core CPU machine (2026-12-07, N=10, nothing beside it: 28 min 41 s in all).
"""

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = {"tests/test_create_data.py::test_kills_at_random_moments_then_resume": "stage-1 stream kills",
         "tests/test_ray_stage.py::test_replica_killed_mid_run_is_retried_by_ray": "Ray replica kill",
         "tests/test_ray_stage.py::test_driver_killed_or_stopped_then_resumed_by_id": "Ray driver kill"}


def outcomes(junit: Path) -> dict:
    """test id -> passed / failed / error / skipped, from pytest's JUnit XML."""
    if not junit.exists():
        return {}
    results = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        test = f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
        kinds = {child.tag for child in case}
        results[test] = next((kind for kind in ("failure", "error", "skipped") if kind in kinds), "passed")
    return results


def last_figures(report: Path) -> dict:
    """test id -> its last check's figures (a test that failed early stops at an earlier check)."""
    figures = {}
    if report.exists():
        for line in report.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            figures[record["test"]] = record
    return figures


def run_once(number: int, log_dir: Path, python: str) -> list[dict]:
    report, junit, log = (log_dir / f"run-{number}.{suffix}" for suffix in ("jsonl", "xml", "log"))
    for path in (report, junit):
        path.unlink(missing_ok=True)
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                        f"--junitxml={junit}", *TESTS], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                       env={**os.environ, "SOAK_REPORT": str(report), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    seconds = time.monotonic() - started
    results, figures = outcomes(junit), last_figures(report)
    rows = []
    for test, name in TESTS.items():
        checked = figures.get(test, {})
        rows.append({"run": number, "test": name, "outcome": results.get(test, "not run"),
                     "lost": checked.get("lost"), "duplicated": checked.get("duplicated"),
                     "last_check": checked.get("when"), "seconds": round(seconds)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="how many times to run the three tests")
    parser.add_argument("--log_dir", default="data/soak", help="each run's pytest log, JUnit XML and figures")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    log_dir = (REPO / args.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    everything = []
    for number in range(1, args.runs + 1):
        rows = run_once(number, log_dir, args.python)
        everything += rows
        print(f"soak run {number}/{args.runs} ({rows[0]['seconds']} s, log {log_dir}/run-{number}.log): " + "; ".join(
            f"{row['test']}: {row['lost']} lost, {row['duplicated']} duplicated, {row['outcome']}" for row in rows),
            flush=True)
    lost = sum(row["lost"] or 0 for row in everything)
    duplicated = sum(row["duplicated"] or 0 for row in everything)
    bad = [row for row in everything if row["outcome"] != "passed" or row["lost"] is None]
    print(f"soak: {args.runs} runs x {len(TESTS)} kill/resume tests: {lost} rows lost, {duplicated} duplicated, "
          f"{len(bad)} tests not passed" + "".join(f"\n  run {row['run']} {row['test']}: {row['outcome']} (last "
                                                    f"check: {row['last_check']})" for row in bad))
    (log_dir / "summary.json").write_text(json.dumps(everything, indent=1) + "\n")
    sys.exit(1 if lost or duplicated or bad else 0)


if __name__ == "__main__":
    main()
