"""The losses, training the explainer head, and the concept and validation splits."""

from __future__ import annotations

import math

import pytest
import torch

from lavise.errors import LaviseError
from lavise.explainer import (
    ExplainerHead, split_by_group, explainer_loss, hardest_negative_loss, hinge_rank_loss, softmax_loss, train_explainer,
)
from lavise.runs import split_concepts
from lavise.settings import TrainSettings

# --- the loss ----------------------------------------------------------------------------


def test_hinge_rank_loss_by_hand():
    concepts = torch.eye(2)  # two orthogonal unit vectors
    right = hinge_rank_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), concepts)
    assert float(right) == pytest.approx(0.0)  # max(0, 1 - 1 + 0)
    wrong = hinge_rank_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), concepts)
    assert float(wrong) == pytest.approx(2.0)  # max(0, 1 - 0 + 1)
    both = hinge_rank_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), concepts)
    assert float(both) == pytest.approx(1.0)  # the mean over samples


def test_hinge_rank_loss_sums_negatives_normalises_and_uses_the_margin():
    concepts = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 0.5]])  # lengths do not matter
    predicted = torch.tensor([[5.0, 5.0, 0.0]])  # cos 1/√2 with concepts 0 and 1, 0 with 2
    s = 2**-0.5
    # target 0: negatives 1 and 2 -> max(0, m - s + s) + max(0, m - s + 0)
    assert float(hinge_rank_loss(predicted, torch.tensor([0]), concepts)) == pytest.approx(1 + (1 - s))
    assert float(hinge_rank_loss(predicted, torch.tensor([0]), concepts, margin=0.5)) == pytest.approx(0.5 + 0.0)
    # target 2: negatives 0 and 1, each 1 - 0 + s
    assert float(hinge_rank_loss(predicted, torch.tensor([2]), concepts)) == pytest.approx(2 * (1 + s))


def test_hinge_rank_loss_excludes_the_positive():
    concepts = torch.eye(3)
    # a perfect prediction costs nothing: the true concept is no negative of itself
    # (counting it would add max(0, margin - 1 + 1) = margin per sample)
    loss = hinge_rank_loss(torch.eye(3), torch.tensor([0, 1, 2]), concepts)
    assert float(loss) == pytest.approx(0.0)


def test_hinge_rank_loss_gradient_flows():
    predicted = torch.tensor([[0.2, 0.9, 0.1]], requires_grad=True)
    loss = hinge_rank_loss(predicted, torch.tensor([0]), torch.eye(3))
    loss.backward()
    assert predicted.grad is not None and predicted.grad.abs().sum() > 0
    # a step along the negative gradient lowers the loss
    with torch.no_grad():
        stepped = predicted - 0.1 * predicted.grad
    assert float(hinge_rank_loss(stepped, torch.tensor([0]), torch.eye(3))) < float(loss.detach())


def test_hardest_negative_loss_takes_the_most_violating_concept_only():
    concepts = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 0.5]])
    predicted = torch.tensor([[5.0, 5.0, 0.0]])
    s = 2**-0.5
    # target 0: violations m - s + s (concept 1) and m - s + 0 (concept 2): the larger, not the sum
    assert float(hardest_negative_loss(predicted, torch.tensor([0]), concepts)) == pytest.approx(1.0)
    assert float(hardest_negative_loss(predicted, torch.tensor([0]), concepts, margin=0.2)) == pytest.approx(0.2)
    # the positive is no negative: a perfect prediction costs nothing at margin < 1
    assert float(hardest_negative_loss(torch.eye(3), torch.tensor([0, 1, 2]), torch.eye(3), margin=0.5)) == pytest.approx(0)
    # never more than the hinge sum, equal with one negative
    assert float(hardest_negative_loss(predicted, torch.tensor([2]), concepts)) == pytest.approx(1 + s)
    two = torch.eye(2)
    x = torch.tensor([[0.3, 0.8]])
    assert float(hardest_negative_loss(x, torch.tensor([0]), two)) == pytest.approx(float(hinge_rank_loss(x, torch.tensor([0]), two)))


def test_softmax_loss_by_hand():
    concepts = torch.tensor([[2.0, 0], [0, 3.0]])
    predicted = torch.tensor([[1.0, 1.0]])  # cosine 1/√2 with both
    assert float(softmax_loss(predicted, torch.tensor([0]), concepts)) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    right = torch.tensor([[1.0, 0.0]])  # cosines 1 and 0; logits 10 and 0 at temperature 0.1
    expected = math.log1p(math.exp(-10))  # -log(e^10 / (e^10 + e^0))
    assert float(softmax_loss(right, torch.tensor([0]), concepts)) == pytest.approx(expected, rel=1e-3)  # float32
    expected_warm = math.log1p(math.exp(-1))  # temperature 1
    assert float(softmax_loss(right, torch.tensor([0]), concepts, temperature=1.0)) == pytest.approx(expected_warm, rel=1e-5)


def test_explainer_loss_follows_the_settings():
    predicted, targets, concepts = torch.tensor([[5.0, 5.0, 0.0]]), torch.tensor([0]), torch.eye(3)
    for settings, expected in ((TrainSettings(), hinge_rank_loss(predicted, targets, concepts)),
                               (TrainSettings(loss="hardest", margin=0.5), hardest_negative_loss(predicted, targets, concepts, 0.5)),
                               (TrainSettings(loss="softmax", temperature=0.5), softmax_loss(predicted, targets, concepts, 0.5))):
        assert float(explainer_loss(settings)(predicted, targets, concepts)) == pytest.approx(float(expected))


@pytest.mark.parametrize("loss", ["hardest", "softmax"])
def test_every_loss_trains_the_head(loss):
    vectors, targets, groups, concept_vectors = _separable()
    settings = TrainSettings(epochs=30, learning_rate=1e-2, train_batch_size=32, validation_fraction=0.25, dropout=0.0,
                             seed=1, loss=loss)
    result = train_explainer(vectors, targets, groups, concept_vectors, settings, progress=False)
    assert result.history[-1]["validation_loss"] < 0.5 * result.history[0]["validation_loss"]
    _, val_rows = split_by_group(groups, 0.25, torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores = torch.nn.functional.normalize(result.head(vectors[val_rows]), dim=1) @ torch.nn.functional.normalize(concept_vectors, dim=1).T
    assert (scores.argmax(dim=1) == targets[val_rows]).float().mean() > 0.9


# --- training ----------------------------------------------------------------------------


def _separable(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    concepts, d, per = 4, 16, 40
    targets = torch.arange(concepts).repeat_interleave(per)
    vectors = torch.zeros(concepts * per, d)
    for c in range(concepts):
        vectors[targets == c, c * 4 : (c + 1) * 4] = 1.0
    vectors += 0.3 * torch.rand(concepts * per, d, generator=generator)
    groups = torch.arange(concepts * per) // 2  # two rows per "image"
    concept_vectors = torch.randn(concepts, 10, generator=generator)
    return vectors, targets, groups, concept_vectors


SETTINGS = TrainSettings(epochs=30, learning_rate=1e-2, train_batch_size=32, validation_fraction=0.25, dropout=0.0, seed=1)


def _validation_loss(head, vectors, targets, groups, concept_vectors, settings) -> float:
    generator = torch.Generator().manual_seed(settings.seed)
    _, val_rows = split_by_group(groups, settings.validation_fraction, generator)
    head.eval()
    with torch.no_grad():
        return float(hinge_rank_loss(head(vectors[val_rows]), targets[val_rows], concept_vectors, settings.margin))


def test_training_learns_separable_data_and_keeps_the_best_epoch():
    vectors, targets, groups, concept_vectors = _separable()
    result = train_explainer(vectors, targets, groups, concept_vectors, SETTINGS, progress=False)
    history = result.history
    assert [h["epoch"] for h in history] == list(range(1, 31))
    assert history[-1]["validation_loss"] < 0.2 * history[0]["validation_loss"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    losses = [h["validation_loss"] for h in history]
    assert result.best_epoch == 1 + losses.index(min(losses))
    assert result.best_epoch < len(history)  # so the last head and the best one differ
    assert not result.head.training
    # the returned head is that of the best epoch, not the last
    got = _validation_loss(result.head, vectors, targets, groups, concept_vectors, SETTINGS)
    assert got == pytest.approx(min(losses), rel=1e-5)
    assert got != pytest.approx(losses[-1], rel=1e-5)

    # the trained head ranks the right concept first on most held-out rows
    generator = torch.Generator().manual_seed(SETTINGS.seed)
    _, val_rows = split_by_group(groups, SETTINGS.validation_fraction, generator)
    with torch.no_grad():
        scores = torch.nn.functional.normalize(result.head(vectors[val_rows]), dim=1) @ torch.nn.functional.normalize(concept_vectors, dim=1).T
    assert (scores.argmax(dim=1) == targets[val_rows]).float().mean() > 0.9


def test_training_is_deterministic_per_seed():
    data = _separable()
    settings = TrainSettings(epochs=3, learning_rate=1e-2, train_batch_size=32, seed=5)
    a = train_explainer(*data, settings, progress=False)
    b = train_explainer(*data, settings, progress=False)
    assert a.history == b.history
    assert all(torch.equal(x, y) for x, y in zip(a.head.state_dict().values(), b.head.state_dict().values()))
    c = train_explainer(*data, TrainSettings(epochs=3, learning_rate=1e-2, train_batch_size=32, seed=6), progress=False)
    assert c.history != a.history


def test_a_last_batch_of_one_is_dropped():
    vectors, targets, groups, concept_vectors = _separable()
    # 160 rows, no validation: batches of 53 leave a last batch of 1, which BatchNorm refuses
    settings = TrainSettings(epochs=2, train_batch_size=53, validation_fraction=0.0)
    result = train_explainer(vectors, targets, groups, concept_vectors, settings, progress=False)
    assert len(result.history) == 2
    assert all(h["validation_loss"] == h["train_loss"] for h in result.history)


def test_explainer_head_shapes():
    head = ExplainerHead(12, 50).eval()
    assert head(torch.rand(3, 12)).shape == (3, 50)
    assert head.channels == 12 and head.word_dim == 50


# --- splits ------------------------------------------------------------------------------

NAMES = [f"concept{i:02d}" for i in range(20)]


def test_split_concepts_draws_without_replacement():
    seen, unseen = split_concepts(NAMES, 0.3, seed=0)
    assert len(unseen) == 6 and len(set(unseen)) == 6
    assert len(seen) == 14
    assert set(seen) | set(unseen) == set(NAMES) and not set(seen) & set(unseen)
    assert seen == sorted(seen) and unseen == sorted(unseen)


def test_split_concepts_is_deterministic_per_seed_and_varies_across_seeds():
    assert split_concepts(NAMES, 0.3, seed=3) == split_concepts(list(reversed(NAMES)), 0.3, seed=3)
    splits = {tuple(split_concepts(NAMES, 0.3, seed=s)[1]) for s in range(6)}
    assert len(splits) > 1
    assert split_concepts(NAMES, 0.0, seed=1) == (sorted(NAMES), [])
    assert split_concepts(NAMES + NAMES[:3], 0.0, seed=1)[0] == sorted(NAMES)  # duplicates once


@pytest.mark.parametrize(("names", "fraction"), [(["a", "b", "c"], 0.5), (["a", "b"], 0.3), (["a"], 0.0), (NAMES, 0.95)])
def test_split_concepts_needs_two_seen_concepts(names, fraction):
    with pytest.raises(LaviseError, match="needs at least 2"):
        split_concepts(names, fraction, seed=0)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_concepts_rejects_fractions_outside_the_range(fraction):
    with pytest.raises(LaviseError, match=r"unseen_fraction must be in \[0, 1\)"):
        split_concepts(NAMES, fraction, seed=0)


def test_validation_split_holds_out_whole_images():
    groups = torch.tensor([7, 7, 7, 2, 2, 9, 4, 4, 4, 4, 1, 5, 5, 8, 3, 3, 0, 6, 6, 6])
    train_rows, val_rows = split_by_group(groups, 0.3, torch.Generator().manual_seed(0))
    assert sorted(train_rows.tolist() + val_rows.tolist()) == list(range(len(groups)))
    train_groups, val_groups = set(groups[train_rows].tolist()), set(groups[val_rows].tolist())
    assert not train_groups & val_groups
    assert len(val_groups) == 3  # round(10 groups * 0.3)
    again = split_by_group(groups, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], val_rows)
    others = {tuple(split_by_group(groups, 0.3, torch.Generator().manual_seed(s))[1].tolist()) for s in range(5)}
    assert len(others) > 1


def test_validation_split_edge_cases():
    groups = torch.tensor([0, 0, 1, 1])
    # a tiny fraction still holds out one image; a large one keeps one for training
    assert len(set(groups[split_by_group(groups, 0.01, torch.Generator())[1]].tolist())) == 1
    train_rows, val_rows = split_by_group(groups, 0.99, torch.Generator())
    assert len(set(groups[train_rows].tolist())) == 1 and len(val_rows) == 2
    # one image, or no validation asked: everything trains
    assert len(split_by_group(torch.tensor([3, 3]), 0.5, torch.Generator())[1]) == 0
    assert len(split_by_group(groups, 0.0, torch.Generator())[1]) == 0
