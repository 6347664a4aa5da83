"""Training the small scene CNN for the demos: on the scenes' concepts, or on group labels.

:func:`train_scene_cnn` teaches it which concepts a scene holds (multi-label), so its
last convolutional layer must represent them; the demo trains it in about a minute on
two CPU cores and explains it next to an ImageNet model. :func:`train_group_classifier`
trains the same network to tell groups of scenes apart from their group labels alone
(the planted-bias demo): whatever concepts it comes to detect, nobody named them. Both
save the backbone only, loadable as ``ModelSpec("scene_cnn", None, path)``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lavise.datasets.base import BadImage, load_rgb
from lavise.datasets.coco import CocoDataset
from lavise.errors import LaviseError
from lavise.models.scene_cnn import PREPROCESSING, SceneCNN, backbone
from lavise.models.scene_vit import scene_vit
from lavise.storage import write_bytes


def _load_scenes(dataset: CocoDataset, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All scenes as uint8 (N, 3, 112, 112) and their (N, C) concept-presence labels."""
    images, labels = [], []
    for index in tqdm(range(len(dataset)), desc="loading scenes", unit="img", disable=not progress):
        try:
            image = _load_scaled(dataset.image_path(index))
        except BadImage:
            continue
        images.append(image)
        row = torch.zeros(len(dataset.concepts))
        row[dataset.image_concepts(index)] = 1
        labels.append(row)
    return torch.stack(images), torch.stack(labels)


def _load_scaled(path: Path) -> torch.Tensor:
    """One image as uint8 (3, 112, 112); raises BadImage."""
    image = load_rgb(path).resize((PREPROCESSING.crop_size, PREPROCESSING.crop_size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def train_scene_cnn(
    dataset: CocoDataset,
    out_path: Path,
    *,
    epochs: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> dict:
    """Train on a scene dataset; save the backbone's state_dict to ``out_path``.

    Returns training facts (epochs, final loss, mean per-concept accuracy on the
    training scenes) for the run's record.
    """
    model, facts = _train_on_concepts(dataset, SceneCNN, epochs=epochs, seed=seed, batch_size=batch_size, device=device,
                                      progress=progress, description="training scene CNN")
    _save_backbone(model, out_path)
    return facts


def train_scene_vit(
    dataset: CocoDataset,
    out_path: Path,
    *,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> dict:
    """Train the small scene ViT on the scenes' concepts, as :func:`train_scene_cnn` trains
    the CNN (multi-label, the same data, flips and schedule); save all but its classifier.

    A transformer learns from 800 scenes more slowly than a CNN, so it gets more epochs
    and a lower peak learning rate (chosen on development seed 0; see docs/evaluation.md).
    """
    model, facts = _train_on_concepts(dataset, scene_vit, epochs=epochs, seed=seed, batch_size=batch_size, device=device,
                                      progress=progress, description="training scene ViT", learning_rate=learning_rate)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(Path(out_path), buffer.getvalue())
    return {**facts, "learning_rate": learning_rate}


def _train_on_concepts(dataset: CocoDataset, build, *, epochs: int, seed: int, batch_size: int, device: torch.device,
                       progress: bool, description: str, learning_rate: float = 3e-3) -> tuple[torch.nn.Module, dict]:
    """A network ``build(outputs)`` taught which concepts each scene holds (multi-label), and its facts."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = _load_scenes(dataset, progress)
    model = build(labels.shape[1]).to(device)
    loss_value, predicted = _fit(
        model, images, labels, F.binary_cross_entropy_with_logits, epochs=epochs, generator=generator,
        batch_size=batch_size, device=device, description=description, progress=progress, learning_rate=learning_rate,
    )
    accuracy = float(((predicted > 0) == labels.bool()).float().mean())
    return model, {"epochs": epochs, "final_loss": loss_value, "train_label_accuracy": accuracy, "seed": seed}


def train_group_classifier(
    images: list[Path],
    groups: list[int],
    out_path: Path,
    *,
    epochs: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    pooling: str = "max",
    init: Path | None = None,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> dict:
    """Train the scene CNN to tell which group each image belongs to; save its backbone.

    Only the group labels are used: no concept is named to the network, nor which
    concepts tell the groups apart. The backbone starts from random weights (seeded) or,
    like an ImageNet model fine-tuned on a new task, from ``init``: a backbone saved by
    :func:`train_scene_cnn`. The saved checkpoint loads as
    ``ModelSpec("scene_cnn", None, str(out_path))``.

    Args:
        images: image files.
        groups: the group index (0, 1, ...) of each image.
        out_path: where the backbone's state_dict is written (atomically).
        epochs: passes over the images; seed: initialisation, batches and flips.
        batch_size: images per step (small data learns faster with smaller batches).
        pooling: "max" (default: the logits depend on each filter's peak, i.e. on whether
            something is anywhere in the image) or "mean".
        init: a scene CNN backbone checkpoint to start from (None: random weights).

    Returns:
        Training facts: epochs, final loss, accuracy on the training images, seed,
        images per group.

    Raises:
        LaviseError: lengths differ, fewer than two groups, or an unreadable image.
    """
    if len(images) != len(groups):
        raise LaviseError(f"{len(images)} images but {len(groups)} group labels; give one label per image.")
    targets = torch.as_tensor(groups, dtype=torch.long)
    if len(targets) == 0 or targets.min() < 0 or len(torch.unique(targets)) < 2:
        raise LaviseError(f"A group classifier needs images of at least two groups (indices 0, 1, ...); got {sorted(set(groups))}.")
    start = _backbone_state(Path(init)) if init is not None else None
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loaded = []
    for path in tqdm(images, desc="loading images", unit="img", disable=not progress):
        try:
            loaded.append(_load_scaled(Path(path)))
        except BadImage as error:
            raise LaviseError(f"Cannot train on '{path}': {error}.") from None
    pixels = torch.stack(loaded)
    num_groups = int(targets.max()) + 1
    model = SceneCNN(num_groups, pooling)
    if start is not None:
        model.features.load_state_dict(start)
    model = model.to(device)
    loss_value, predicted = _fit(
        model, pixels, targets, F.cross_entropy, epochs=epochs, generator=generator, batch_size=batch_size,
        device=device, description="training group classifier", progress=progress,
    )
    accuracy = float((predicted.argmax(dim=1) == targets).float().mean())
    _save_backbone(model, out_path)
    return {
        "epochs": epochs, "final_loss": loss_value, "train_accuracy": accuracy, "seed": seed,
        "images_per_group": torch.bincount(targets, minlength=num_groups).tolist(),
    }


def _fit(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss_function,
    *,
    epochs: int,
    generator: torch.Generator,
    batch_size: int = 64,
    device: torch.device,
    description: str,
    progress: bool,
    learning_rate: float = 3e-3,
) -> tuple[float, torch.Tensor]:
    """AdamW with a one-cycle schedule (peak ``learning_rate``), random horizontal flips.

    (N, 3, 112, 112) uint8 images, (N, ...) targets -> (last loss, (N, outputs) logits)
    """
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=learning_rate, total_steps=steps)
    mean = torch.tensor(PREPROCESSING.mean).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESSING.std).view(1, 3, 1, 1)

    def batch(rows: torch.Tensor, flip: bool) -> torch.Tensor:
        x = (images[rows].float() / 255 - mean) / std
        if flip:
            x = torch.where(torch.rand(len(rows), 1, 1, 1, generator=generator) < 0.5, x.flip(3), x)
        return x.to(device)

    bar = tqdm(range(epochs), desc=description, unit="epoch", disable=not progress)
    loss_value = float("nan")
    for _ in bar:
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if len(rows) < 2:
                continue
            loss = loss_function(model(batch(rows, True)), targets[rows].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(batch(torch.arange(s, min(s + 256, len(images))), False)).cpu() for s in range(0, len(images), 256)])
    return loss_value, predicted


def _backbone_state(path: Path) -> dict[str, torch.Tensor]:
    """The ``features`` weights of a saved backbone, keyed as in ``model.features``."""
    if not path.is_file():
        raise LaviseError(f"Scene CNN checkpoint '{path}' does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise LaviseError(f"'{path}' is not a scene CNN checkpoint: {error}") from None
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if set(features) != set(backbone().state_dict()):
        raise LaviseError(f"'{path}' does not hold a scene CNN backbone (its keys differ from features.*).")
    return features


def _save_backbone(model: SceneCNN, out_path: Path) -> None:
    """Write the backbone's state_dict, the same bytes for the same weights.

    torch.save names the archive inside the file after the file it writes to; saving
    to memory first keeps the random name of the temporary file out of it, so the
    checkpoint's digest, which the feature cache and the run record, depends on the
    weights alone.
    """
    state = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(Path(out_path), buffer.getvalue())
