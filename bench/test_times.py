"""Did any test get slower? The same test files, run by this checkout and an earlier one.

``python bench/test_times.py --before ../before FILE...`` runs ``pytest -m "not e2e"``
on the files in both checkouts, alternating (ABBA) for ``--rounds``, and compares the
tests both have by their median wall time: the whole set's total, and every test that is
slower by more than 10% and by more than ``--min-ms`` (shorter differences are noise).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.bench_graph import ROOT, checkout_commit, run_header


def run_tests(root: Path, files: list[str], report: Path) -> dict[str, float]:
    """Each passing test's wall time (setup, call and teardown), by node id; a failing test
    is named on stderr and left out (its time measures nothing)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "not e2e", "-p", "no:randomly"]
    command += ["--timeout", "600", f"--junitxml={report}", *files]
    subprocess.run(command, cwd=root, check=False, stdout=subprocess.DEVNULL)
    times: dict[str, float] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            print(f"failed in {root}: {test}", file=sys.stderr)
        elif case.find("skipped") is None:
            times[test] = float(case.get("time", 0))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--before", type=Path, required=True, help="the earlier checkout")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-ms", type=float, default=200.0)
    args = parser.parse_args()
    roots = {"this": ROOT, "before": args.before.resolve()}
    times: dict[str, list[dict[str, float]]] = {name: [] for name in roots}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = list(roots) if round_ % 2 == 0 else list(roots)[::-1]
            for name in order:
                report = Path(tmp) / f"{name}-{round_}.xml"
                times[name].append(run_tests(roots[name], args.files, report))
    common = sorted(set.intersection(*(set(t) for runs in times.values() for t in runs)))

    def median(name: str, test: str) -> float:
        return statistics.median(run[test] for run in times[name])

    before_total = sum(median("before", t) for t in common)
    this_total = sum(median("this", t) for t in common)
    print(run_header(f"{len(common)} tests in both, medians of {args.rounds} rounds (ABBA)"))
    print(f"against {checkout_commit(roots['before'])}: {', '.join(args.files)}\n")
    print("| tests | before s | this s | change |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| all {len(common)} in both | {before_total:.1f} | {this_total:.1f} "
        f"| {100 * (this_total / before_total - 1):+.1f}% |"
    )
    for test in common:
        before, this = median("before", test), median("this", test)
        if this > 1.1 * before and (this - before) * 1000 > args.min_ms:
            print(f"| {test} | {before:.2f} | {this:.2f} | {100 * (this / before - 1):+.1f}% |")


if __name__ == "__main__":
    main()
