"""The cost of naming filters against a large vocabulary, next to the matrix product alone.

Explaining a layer ends with the nearest words of d·p explainer outputs among V word
vectors: for ResNet-50's 2,048 filters × 25 top images against GloVe's 400,000 words
of 300 dimensions, a (51,200 × 300) × (300 × 400,000) product and a top-5 per row. This
times, on random unit vectors of those sizes and with every core:

- the matrix product alone, in the chunks of 1,024 queries lavise uses (the floor);
- ``torch.topk`` over each chunk's scores after it (what lavise did before 0.5);
- :func:`lavise.naming.nearest_words`, whose top-k first keeps the best blocks of 256 words;

and checks that the last two find the same words.

    python benchmarks/naming.py [--filters 2048] [--images 25] [--words 400000] [--dim 300]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from lavise.naming import nearest_words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", type=int, default=2048)
    parser.add_argument("--images", type=int, default=25)
    parser.add_argument("--words", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=300)
    parser.add_argument("--per-image", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(args.filters * args.images, args.dim, generator=generator), dim=1)
    vocabulary = F.normalize(torch.randn(args.words, args.dim, generator=generator), dim=1)
    chunk = 1024
    flops = 2 * len(queries) * args.words * args.dim
    print(f"{len(queries):,} queries ({args.filters} filters x {args.images} images) x {args.words:,} words x "
          f"{args.dim} dimensions, top {args.per_image}; {args.threads} threads; {flops / 1e12:.1f} TFLOP")

    start = time.perf_counter()
    for i in range(0, len(queries), chunk):
        queries[i : i + chunk] @ vocabulary.T
    product = time.perf_counter() - start
    print(f"matrix product alone:             {product:7.1f} s ({flops / product / 1e9:.0f} GFLOP/s)")

    start = time.perf_counter()
    plain = [torch.topk(queries[i : i + chunk] @ vocabulary.T, args.per_image, dim=1).indices
             for i in range(0, len(queries), chunk)]
    plain_time = time.perf_counter() - start
    print(f"product + torch.topk (lavise 0.4): {plain_time:7.1f} s ({plain_time / product:.2f} x the product)")

    start = time.perf_counter()
    ids, _ = nearest_words(queries, vocabulary, args.per_image, chunk=chunk)
    blocked = time.perf_counter() - start
    print(f"nearest_words (lavise 0.5):        {blocked:7.1f} s ({blocked / product:.2f} x the product)")
    # nearest_words normalises the queries again (csls_scores), so scores may differ in the
    # last bit: rows whose words differ must be near-ties, at most a float's error apart
    plain = torch.cat(plain)
    differ = (plain != ids).any(dim=1).nonzero().flatten()
    gaps = [float((queries[r] @ vocabulary[plain[r]].T - queries[r] @ vocabulary[ids[r]].T).abs().max())
            for r in differ.tolist()]
    print(f"same words as torch.topk: {len(queries) - len(differ):,} of {len(queries):,} rows; the others are "
          f"ties within {max(gaps, default=0.0):.1e} in score")


if __name__ == "__main__":
    main()
