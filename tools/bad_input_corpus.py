"""Count the cases of the bad-input corpus and how many hold.

The corpus is every test in ``tests/bad_input/`` and ``tests/test_bad_input.py``: each
makes its own bad input (a broken file, a hostile annotation, a wrong option, a full
disk, a damaged run) and asserts what lavise does with it — a clear message naming the
file or argument, a warning that counts what was skipped, or a previous result left
intact. A parametrized test counts once per case.

    python tools/bad_input_corpus.py            # the table, then "N of M cases hold"
    python tools/bad_input_corpus.py -k coco    # pytest's -k, to count a part

Exit status 0 when every case holds, 1 otherwise (failing cases are listed).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = [ROOT / "tests" / "bad_input", ROOT / "tests" / "test_bad_input.py"]


class _Tally:
    """A pytest plugin that keeps each case's outcome, by file."""

    def __init__(self) -> None:
        self.outcomes: dict[str, dict[str, str]] = defaultdict(dict)

    def pytest_runtest_logreport(self, report) -> None:
        path, _, case = report.nodeid.partition("::")
        failed = report.failed
        if report.when == "call" or failed or report.skipped:
            previous = self.outcomes[path].get(case)
            if previous != "failed":
                self.outcomes[path][case] = "failed" if failed else "skipped" if report.skipped else "passed"


def _area(path: Path) -> str:
    """The first line of a test file's docstring, without its 'Bad input:' prefix."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or path.stem
    summary = " ".join(doc.split("\n\n")[0].split()).removeprefix("Bad input:").strip().rstrip(".")
    return summary if len(summary) <= 80 else summary[:79].rsplit(" ", 1)[0] + " …"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="only the cases matching this pytest -k expression")
    args = parser.parse_args(argv)
    tally = _Tally()
    options = ["-q", "-p", "no:cacheprovider", "--no-header", "-rN", *map(str, CORPUS)]
    if args.k:
        options += ["-k", args.k]
    pytest.main(options, plugins=[tally])

    total = held = 0
    print(f"\n{'file':22} {'cases':>5} {'hold':>5}  what it covers")
    failing = []
    for path in sorted(tally.outcomes):
        cases = tally.outcomes[path]
        good = sum(outcome == "passed" for outcome in cases.values())
        failing += [f"{path}::{case} ({outcome})" for case, outcome in cases.items() if outcome != "passed"]
        total, held = total + len(cases), held + good
        print(f"{Path(path).name:22} {len(cases):5} {good:5}  {_area(ROOT / path)}")
    print(f"\n{held} of {total} bad-input cases hold")
    for case in failing:
        print(f"  does not hold: {case}")
    return 0 if total and held == total else 1


if __name__ == "__main__":
    sys.exit(main())
