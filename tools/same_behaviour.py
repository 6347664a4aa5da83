"""Does a change keep lavise's results? The demo at one seed, before and after, byte for byte.

Runs ``lavise demo`` and then ``lavise evaluate`` on both demo runs, once with the
package as it was at a git revision (``--before``) and once with the working tree's
``src/`` (``--after``, or another revision), each with fresh caches, in the same output
folder so that the absolute paths recorded in the outputs agree. Then compares the
outputs that carry results byte for byte: each run's ``explanations.json``,
``explanations.csv``, ``evaluation.json`` and ``evaluation.md``, and what the demo
printed. Both sides are copied before anything runs, so the working tree may change
meanwhile.

    python tools/same_behaviour.py --before 726ef50 --work /tmp/lavise-same

The outputs are deterministic on one machine with one thread setting; on another
machine or another torch, the two sides may differ in the last bits of a float even
when the code does the same thing.

When a change adds outputs, ``--results`` compares what both sides report instead of
bytes: every filter's words, and every score both evaluations hold; ``--after-demo`` and
``--after-evaluate`` give the after side options, such as the settings that reproduce
an earlier version::

    python tools/same_behaviour.py --before 961204f --results \
        --after-demo "--vocabulary frequent --no-background-concepts" \
        --after-evaluate "--vocabulary frequent --retrieval cosine --no-concept-names"
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("explanations.json", "explanations.csv", "evaluation.json", "evaluation.md")
RUNS = ("efficientnet_lite0", "scene_cnn")


def snapshot(revision: str | None, destination: Path) -> Path:
    """``src/`` of a revision (or of the working tree when None), copied under ``destination``."""
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    if revision is None:
        shutil.copytree(REPO / "src", destination / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    else:
        archive = destination / "src.tar"
        subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), revision, "src"], check=True)
        with tarfile.open(archive) as handle:
            handle.extractall(destination, filter="data")
        archive.unlink()
    return destination / "src"


def run_side(name: str, source: Path, demo: Path, seed: int, log: Path, demo_options: tuple[str, ...] = (),
             evaluate_options: tuple[str, ...] = ()) -> str:
    """Run the demo and evaluate it with the package under ``source``; return the demo's output."""
    if demo.exists():
        shutil.rmtree(demo)
    environment = {**os.environ, "PYTHONPATH": str(source), "LAVISE_CACHE": str(demo / "cache")}
    where = subprocess.run(
        [sys.executable, "-c", "import lavise; print(lavise.__file__)"], env=environment,
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(source.resolve()):
        raise SystemExit(f"{name}: 'import lavise' found {where}, not the copy under {source}.")
    commands = [
        ["demo", "--out", str(demo), "--seed", str(seed), "--no-progress", *demo_options],
        ["evaluate", *(str(demo / "runs" / r) for r in RUNS), "--dataset",
         str(demo / "data" / "evaluation" / "annotations.json"), "--cache-dir", str(demo / "cache"), "--no-progress",
         *evaluate_options],
    ]
    printed = []
    for arguments in commands:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "lavise.cli", *arguments], env=environment,
                                capture_output=True, text=True)
        with log.open("a", encoding="utf-8") as handle:
            handle.write(f"$ lavise {' '.join(arguments)}\n{result.stdout}{result.stderr}\n")
        if result.returncode != 0:
            raise SystemExit(f"{name}: 'lavise {arguments[0]}' failed ({result.returncode}); see {log}.")
        print(f"{name}: lavise {arguments[0]} took {time.perf_counter() - start:.0f} s", flush=True)
        printed.append(result.stdout)
    return printed[0]


def json_differences(a: Path, b: Path, limit: int = 5) -> list[str]:
    """Where two JSON files differ: up to ``limit`` key paths, for a readable report."""
    found: list[str] = []

    def walk(x, y, where: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=str):
                walk(x.get(key), y.get(key), f"{where}.{key}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif x != y:
            found.append(f"{where or '.'}: {str(x)[:60]} != {str(y)[:60]}")

    walk(json.loads(a.read_text()), json.loads(b.read_text()), "")
    return found


def _shared_differences(p: dict, q: dict, where: str) -> list[str]:
    """Differences of the values both mappings hold, nested mappings key by key; a new
    score on one side (a new key) is not a difference, nor is a confidence."""
    found = []
    for key in sorted(set(p) & set(q)):
        if key == "confidence":
            continue
        if isinstance(p[key], dict) and isinstance(q[key], dict):
            found += _shared_differences(p[key], q[key], f"{where}.{key}")
        elif p[key] != q[key]:
            found.append(f"{where}.{key}: {p[key]} != {q[key]}")
    return found


def result_differences(a: Path, b: Path) -> list[str]:
    """What two explanations or evaluations report differently: words, and the scores both hold."""
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    found = []
    if "methods" in x:  # an evaluation: the summary numbers both sides have, and each filter's words
        for method in sorted(set(x["methods"]) | set(y["methods"])):
            p, q = x["methods"].get(method) or {}, y["methods"].get(method) or {}
            found += _shared_differences(p, q, f"methods.{method}")
        pairs = [(f"filters[{e['filter']}].{m}", e["methods"][m]["words"], g["methods"].get(m, {}).get("words"))
                 for e, g in zip(x["filters"], y["filters"]) for m in e["methods"]]
    else:
        pairs = [(f"filters[{e['filter']}]", e["words"], g["words"]) for e, g in zip(x["filters"], y["filters"])]
    found += [f"{where}: words differ" for where, u, v in pairs if u != v]
    if len(x["filters"]) != len(y["filters"]):
        found.append(f"filters: {len(x['filters'])} != {len(y['filters'])}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the reference side")
    parser.add_argument("--after", default=None, help="git revision of the other side (default: the working tree)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lavise-same-behaviour"))
    parser.add_argument("--results", action="store_true",
                        help="compare the words and scores both sides report, not the files' bytes")
    parser.add_argument("--after-demo", default="", help="options for the after side's 'lavise demo'")
    parser.add_argument("--after-evaluate", default="", help="options for the after side's 'lavise evaluate'")
    parser.add_argument("--compare-only", action="store_true",
                        help="run nothing: compare the outputs a previous call left in --work")
    args = parser.parse_args()
    if args.compare_only and not args.results:
        parser.error("--compare-only compares results (--results): what the demo printed is not kept")

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    demo, outputs, printed = work / "demo", {side: work / f"{side}-out" for side in ("before", "after")}, {}
    sides = {} if args.compare_only else {"before": snapshot(args.before, work / "before"),
                                          "after": snapshot(args.after, work / "after")}
    for name, source in sides.items():
        log = work / f"{name}.log"
        log.unlink(missing_ok=True)
        options = (tuple(shlex.split(args.after_demo)), tuple(shlex.split(args.after_evaluate))) if name == "after" else ((), ())
        printed[name] = run_side(name, source, demo, args.seed, log, *options)
        if outputs[name].exists():
            shutil.rmtree(outputs[name])
        demo.rename(outputs[name])

    differing = []
    if args.results:
        for run in RUNS:
            for file in ("explanations.json", "evaluation.json"):
                a, b = (outputs[side] / "runs" / run / file for side in ("before", "after"))
                lines = result_differences(a, b)
                print(f"{'same results' if not lines else 'DIFFERENT'}  runs/{run}/{file}")
                for line in lines[:8]:
                    print(f"           {line}")
                if lines:
                    differing.append(f"runs/{run}/{file}")
        after = args.after or "the working tree"
        print(f"\n{args.before} -> {after}: " + ("the same words and scores" if not differing
                                                 else f"{len(differing)} outputs differ: {', '.join(differing)}"))
        return 1 if differing else 0
    for run in RUNS:
        for file in COMPARED:
            a, b = (outputs[side] / "runs" / run / file for side in ("before", "after"))
            same = a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)
            print(f"{'identical' if same else 'DIFFERENT'}  runs/{run}/{file} ({a.stat().st_size if a.is_file() else 0} bytes)")
            if not same:
                differing.append(f"runs/{run}/{file}")
                if a.is_file() and b.is_file() and file.endswith(".json"):
                    for line in json_differences(a, b):
                        print(f"           {line}")
    same_output = printed["before"] == printed["after"]
    print(f"{'identical' if same_output else 'DIFFERENT'}  what 'lavise demo' printed ({len(printed['before'])} characters)")
    if not same_output:
        differing.append("demo output")
    after = args.after or "the working tree"
    print(f"\n{args.before} -> {after}: " + ("every compared output is identical" if not differing
                                             else f"{len(differing)} outputs differ: {', '.join(differing)}"))
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
