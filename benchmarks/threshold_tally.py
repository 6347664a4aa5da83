"""Time T_u over maps held at once against the streaming tally that training uses.

The reference thresholds for activation-region training come from ThresholdTally, which
sees the maps one batch at a time so a reference set need not fit in memory. This checks
it gives the same thresholds and says what the streaming costs.

    python benchmarks/threshold_tally.py [--images 2000] [--filters 256] [--grid 14]
"""

from __future__ import annotations

import argparse
import time

import torch

from lavise.regions import ThresholdTally, quantile_thresholds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--filters", type=int, default=256)
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quantile", type=float, default=0.005)
    args = parser.parse_args()
    torch.manual_seed(0)
    maps = torch.randn(args.images, args.filters, args.grid, args.grid).relu()
    started = time.perf_counter()
    at_once = quantile_thresholds(maps, args.quantile)
    middle = time.perf_counter()
    tally = ThresholdTally(args.quantile, positions=args.images * args.grid * args.grid)
    for batch in maps.split(args.batch):
        tally.add(batch)
    streamed = tally.thresholds()
    ended = time.perf_counter()
    print(f"{args.images} images, {args.filters} filters, {args.grid}x{args.grid} grid, quantile {args.quantile}, "
          f"{torch.get_num_threads()} threads")
    print(f"all at once: {middle - started:.2f} s; streamed in batches of {args.batch}: {ended - middle:.2f} s, "
          f"keeping {tally.keep} values per filter; identical: {torch.equal(at_once, streamed)}")


if __name__ == "__main__":
    main()
