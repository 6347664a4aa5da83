"""Diagnostics of evaluation.json files: does a method name every filter the same way?

For each run's evaluation and method: the scored filters, how many distinct top-1 words
they get, and the three most frequent top-1 words with their counts. A method whose
input does not depend on the filter (``original``; image masking when the masked images
are mostly blank) names every filter alike.

    python experiments/evaluation_diagnostics.py /tmp/lavise-eval/seed-*/runs/*/evaluation.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args()
    print("| evaluation | method | scored filters | distinct top-1 words | most frequent top-1 words |")
    print("|---|---|---|---|---|")
    for path in args.files:
        data = json.loads(path.read_text())
        scored = [f for f in data["filters"] if f["ground_truth"]]
        for method in data["methods"]:
            top = Counter(f["methods"][method]["words"][0] for f in scored if f["methods"][method]["words"])
            common = ", ".join(f"{w} ({c})" for w, c in top.most_common(3))
            print(f"| {path.parent.parent.parent.name}/{data['model']} | {method} | {len(scored)} | {len(top)} | {common} |")


if __name__ == "__main__":
    main()
