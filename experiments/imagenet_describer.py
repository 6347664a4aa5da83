"""Could an ImageNet classifier name the demo's concepts? The ceiling of a "describer".

A way to name concepts nobody annotated for the explainer is to describe a filter's
regions with a model that already knows many words: classify the region with
EfficientNet-Lite0's ImageNet head and embed the prediction as ConSE does (the
probability-weighted mean of the top T class names' word vectors). Before building that,
this script measures its ceiling: every OpenMoji concept of the default vocabulary,
drawn alone and centred on grey (the easiest case, no scene around it), is classified,
embedded, and the vocabulary's 20,000 words ranked by cosine. Recall@k is the share of
concepts whose own word is among the k nearest.

    python experiments/imagenet_describer.py

Prints recall@5/20/100 for T = 1, 5, 10, 50 and the top class of the first concepts.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models import ResNet50_Weights

from lavise.embeddings import load_word_vectors
from lavise.models.efficientnet_lite import build_efficientnet_lite0
from lavise.synthetic import concept_pool, render_concept


def concept_image(concept, size: int = 224, glyph: int = 150) -> torch.Tensor:
    """The concept's emoji centred on mid-grey, (3, size, size) in [0, 1]."""
    emoji = render_concept(concept, glyph).convert("RGBA")
    canvas = Image.new("RGBA", (size, size), (128, 128, 128, 255))
    canvas.alpha_composite(emoji, ((size - emoji.width) // 2, (size - emoji.height) // 2))
    return torch.from_numpy(np.array(canvas.convert("RGB"))).permute(2, 0, 1).float() / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", type=int, default=20, help="concepts whose top class is printed")
    args = parser.parse_args()
    torch.set_num_threads(2)
    vectors = load_word_vectors()
    vocabulary = vectors.vocabulary(size=20_000)
    pool = concept_pool(set(vocabulary.words))
    model, preprocessing = build_efficientnet_lite0("IMAGENET")
    classes = list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    class_vectors = torch.stack([
        v if (v := vectors.phrase_vector(name)) is not None else torch.zeros(vectors.dim) for name in classes
    ])
    class_vectors = F.normalize(class_vectors, dim=1)

    images = torch.stack([concept_image(c) for c in pool])
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        probabilities = torch.cat([model((images[i : i + 64] - mean) / std) for i in range(0, len(images), 64)]).softmax(1)

    index = {w: i for i, w in enumerate(vocabulary.words)}
    own = torch.tensor([index[c.word] for c in pool])
    print(f"{len(pool)} concepts, {len(vocabulary)} words\n")
    print("| T classes | R@5 | R@20 | R@100 |")
    print("|---|---|---|---|")
    for count in (1, 5, 10, 50):
        top = probabilities.topk(count, dim=1)
        embedded = F.normalize(torch.einsum("nt,ntd->nd", top.values, class_vectors[top.indices]), dim=1)
        similarity = embedded @ vocabulary.unit_vectors.T
        rank = (similarity > similarity.gather(1, own.unsqueeze(1))).sum(dim=1)
        print(f"| {count} | " + " | ".join(f"{(rank < k).float().mean().item():.3f}" for k in (5, 20, 100)) + " |")
    print()
    best = probabilities.max(dim=1)
    for concept, cls, p in list(zip(pool, best.indices.tolist(), best.values.tolist()))[: args.show]:
        print(f"{concept.word:>14} -> {classes[cls]} ({p:.2f})")


if __name__ == "__main__":
    main()
