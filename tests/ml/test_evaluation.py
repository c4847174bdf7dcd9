"""ml.evaluation: an accuracy under attack depends on the images and the seed only, never on the
batch size or on how torchrun shards the images (the PGD random starts are seeded per image)."""
import numpy as np
import pytest
import torch

from ml import evaluation
from ml.attacks import ExampleSeeds, eval_attack, pgd_linf
from ml.models import build_model
from pipeline.core import distributed


@pytest.fixture
def model_and_data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 23)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("tiny-cnn", num_classes=3, in_channels=1)
    return model.eval(), images, labels


def test_random_starts_are_per_example():
    x = torch.rand(6, 1, 4, 4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    seeds = [11, 12, 13, 14, 15, 16]

    def start(rows):
        return pgd_linf(model, x[rows], torch.zeros(len(x[rows]), dtype=torch.int64), eps=0.3,
                        step_size=0.1, steps=0, generator=ExampleSeeds([seeds[i] for i in rows], "cpu"))

    assert torch.equal(start([0, 1, 2, 3])[2:], start([2, 3, 4])[:2])  # same image, same start, any batch
    assert not torch.equal(start([0])[0], start([1])[0] - x[1] + x[0])  # different images, different noise


def test_accuracy_is_the_same_for_any_batch_size_and_sharding(model_and_data, monkeypatch):
    model, images, labels = model_and_data
    # A weak attack (one step from a wide random start): its accuracy depends on the starts drawn.
    attack = eval_attack(0.3, steps=1)
    accuracy = {b: evaluation.evaluate(model, images, labels, device=torch.device("cpu"), batch_size=b,
                                       attack=attack, seed=5) for b in (1, 4, 16, 64)}
    assert len(set(accuracy.values())) == 1, accuracy
    # Two torchrun ranks, each scoring its shard: summing the ranks' counts gives the same accuracy.
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda tensor: None)  # each rank keeps its own count
    shards = [evaluation.evaluate(model, images, labels, device=torch.device("cpu"), batch_size=4, attack=attack,
                                  seed=5, rank=r, world_size=2) for r in (0, 1)]
    assert shards[0] > 0 and shards[1] > 0
    assert sum(shards) == pytest.approx(accuracy[1])
    # The seed does reach the starts: some seed gives another accuracy.
    others = {evaluation.evaluate(model, images, labels, device=torch.device("cpu"), batch_size=4, attack=attack,
                                  seed=s) for s in range(6, 16)}
    assert others - {accuracy[1]}
