"""The explainer head, its losses (the paper's hinge rank loss and two from the literature), and training it on cached pooled vectors."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lavise.settings import TrainSettings


class ExplainerHead(nn.Module):
    """Maps a pooled d-vector of the target layer to the word-vector space.

    BatchNorm → Dropout → Linear(d, d) → ReLU → BatchNorm → Dropout → Linear(d, D), the
    head of the authors' code. Its input is the layer's features pooled under a mask or
    a region, by the run's pooling (:mod:`lavise.inputs`).

    (n, d) -> (n, D)
    """

    def __init__(self, channels: int, word_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.channels = channels
        self.word_dim = word_dim
        self.layers = nn.Sequential(
            nn.BatchNorm1d(channels),
            nn.Dropout(dropout),
            nn.Linear(channels, channels),
            nn.ReLU(),
            nn.BatchNorm1d(channels),
            nn.Dropout(dropout),
            nn.Linear(channels, word_dim),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled)


def _cosines(predicted: torch.Tensor, concept_vectors: torch.Tensor) -> torch.Tensor:
    """(n, D), (C, D) -> (n, C) cosine similarities of predictions and concept vectors."""
    return F.normalize(predicted, dim=1) @ F.normalize(concept_vectors, dim=1).T


def _margin_violations(predicted: torch.Tensor, targets: torch.Tensor, concept_vectors: torch.Tensor,
                       margin: float) -> torch.Tensor:
    """(n, C) max(0, margin − v_tᵀv̂ + v_cᵀv̂) per sample and concept, 0 for the true concept (no negative)."""
    similarity = _cosines(predicted, concept_vectors)
    positive = similarity.gather(1, targets.unsqueeze(1))  # (n, 1)
    return (margin - positive + similarity).clamp_min(0).scatter(1, targets.unsqueeze(1), 0.0)


def hinge_rank_loss(
    predicted: torch.Tensor, targets: torch.Tensor, concept_vectors: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Equation 1: mean over samples of Σ_{c≠t} max(0, margin − v_tᵀv̂ + v_cᵀv̂).

    Predictions and concept vectors are L2-normalised first.

    (n, D), (n,) long, (C, D) -> scalar
    """
    return _margin_violations(predicted, targets, concept_vectors, margin).sum(dim=1).mean()


def hardest_negative_loss(
    predicted: torch.Tensor, targets: torch.Tensor, concept_vectors: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """VSE++'s max of hinges (Faghri et al., 2018): mean over samples of max_{c≠t} max(0, margin − v_tᵀv̂ + v_cᵀv̂).

    Only the most violating concept is pushed away, so many concepts that are already far
    do not add up to outweigh the one that is near.

    (n, D), (n,) long, (C, D) -> scalar
    """
    return _margin_violations(predicted, targets, concept_vectors, margin).max(dim=1).values.mean()


def softmax_loss(
    predicted: torch.Tensor, targets: torch.Tensor, concept_vectors: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Cross-entropy of the true concept under a softmax over the cosines divided by a temperature,
    the zero-shot classifiers' loss (normalised-softmax, as in CLIP's image-to-text half).

    (n, D), (n,) long, (C, D) -> scalar
    """
    return F.cross_entropy(_cosines(predicted, concept_vectors) / temperature, targets)


def explainer_loss(settings: TrainSettings):
    """The loss ``settings.loss`` names, as (predicted, targets, concept_vectors) -> scalar."""
    if settings.loss == "softmax":
        return lambda predicted, targets, concepts: softmax_loss(predicted, targets, concepts, settings.temperature)
    rank = hardest_negative_loss if settings.loss == "hardest" else hinge_rank_loss
    return lambda predicted, targets, concepts: rank(predicted, targets, concepts, settings.margin)


@dataclass
class TrainingResult:
    """The trained head, its losses per epoch, the epoch kept, and the rows held out to choose it."""

    head: ExplainerHead
    history: list[dict]
    best_epoch: int
    validation_rows: torch.Tensor


VALIDATION_BATCH = 4096  # rows per step of the validation loss: the same sum in memory and from disk


def train_explainer(
    vectors,
    targets: torch.Tensor,
    groups: torch.Tensor,
    concept_vectors: torch.Tensor,
    settings: TrainSettings,
    *,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> TrainingResult:
    """Train the head on pooled vectors; keep the epoch with the lowest validation loss.

    Args:
        vectors: (n, d) pooled masked features: a tensor, or rows read from disk per batch
            (anything indexed by a tensor of row numbers, :class:`lavise.reference.ChunkedRows`);
            both give the same explainer.
        targets: (n,) index of each row's concept in ``concept_vectors``.
        groups: (n,) the image each row comes from; validation holds out whole images.
        concept_vectors: (C, D) vectors of the training (seen) concepts.
        settings: epochs, batch size, learning rate, loss (and its margin or temperature), dropout, seed.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    train_rows, val_rows = split_by_group(groups, settings.validation_fraction, generator)
    torch.manual_seed(settings.seed)
    head = ExplainerHead(vectors.shape[1], concept_vectors.shape[1], settings.dropout).to(device)
    optimiser = torch.optim.Adam(head.parameters(), lr=settings.learning_rate)
    in_memory = isinstance(vectors, torch.Tensor)
    if in_memory:
        vectors = vectors.to(device)
    targets, concepts = targets.to(device), concept_vectors.to(device)

    def rows(index: torch.Tensor) -> torch.Tensor:
        return vectors[index] if in_memory else vectors[index.cpu()].to(device)

    loss_of = explainer_loss(settings)
    history, best_loss, best_state, best_epoch = [], math.inf, None, 0
    # BatchNorm cannot train on a batch of one; drop such a last batch.
    drop_last = len(train_rows) % settings.train_batch_size == 1
    bar = tqdm(range(1, settings.epochs + 1), desc="training explainer", unit="epoch", disable=not progress)
    for epoch in bar:
        head.train()
        order = train_rows[torch.randperm(len(train_rows), generator=generator)]
        total, count = 0.0, 0
        for start in range(0, len(order), settings.train_batch_size):
            batch = order[start : start + settings.train_batch_size]
            if len(batch) < 2 and drop_last:
                continue
            loss = loss_of(head(rows(batch)), targets[batch], concepts)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
            count += len(batch)
        train_loss = total / max(count, 1)
        val_loss = _evaluate(head, rows, targets, concepts, val_rows, loss_of) if len(val_rows) else train_loss
        history.append({"epoch": epoch, "train_loss": train_loss, "validation_loss": val_loss})
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    head.eval()
    return TrainingResult(head=head.cpu(), history=history, best_epoch=best_epoch, validation_rows=val_rows)


@torch.inference_mode()
def head_outputs(head: ExplainerHead, vectors, rows: torch.Tensor, *, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The head's outputs for some rows of ``vectors`` (a tensor or rows read from disk), in steps.

    (n,) row indices -> (n, D) on the CPU
    """
    head = head.to(device).eval()
    parts = [head(vectors[rows[start : start + VALIDATION_BATCH]].to(device)).cpu()
             for start in range(0, len(rows), VALIDATION_BATCH)]
    return torch.cat(parts) if parts else torch.zeros(0, head.word_dim)


@torch.no_grad()
def _evaluate(head, rows_of, targets, concepts, rows, loss_of) -> float:
    """The mean loss over ``rows``, in steps of :data:`VALIDATION_BATCH` rows."""
    head.eval()
    total = 0.0
    for start in range(0, len(rows), VALIDATION_BATCH):
        part = rows[start : start + VALIDATION_BATCH]
        total += float(loss_of(head(rows_of(part)), targets[part], concepts)) * len(part)
    return total / len(rows)


def split_by_group(
    groups: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices for training and validation, holding out whole groups (images)."""
    unique = torch.unique(groups)
    held = round(len(unique) * fraction)
    if fraction > 0 and len(unique) >= 2:
        held = min(max(held, 1), len(unique) - 1)
    else:
        held = 0
    held_groups = unique[torch.randperm(len(unique), generator=generator)[:held]]
    is_val = torch.isin(groups, held_groups)
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()
