"""The training loop's weights after a few steps, pinned against a reference computed by the code as it
was before the training loop was restructured and sped up (issue 14: "identical weights to today's for
the same seed"): a MART run with pool, augmentation and EMA, a natural (teacher) run, and the MART run
killed mid-epoch and resumed, which must land on the uninterrupted run's weights.

The reference holds a sha256 per tensor. Float results depend on the CPU's kernel set (oneDNN picks
AVX2 or AVX-512 code) and on the thread count, so the comparison is exact (bitwise) on the kernel set
the reference was made with, one thread, and close (rtol 1e-4) elsewhere.

Regenerate (only when a change of results is intended): python -m tests.stages.test_reference_weights
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

REFERENCE = Path(__file__).with_name("reference_weights.json")
SCENARIOS = ("mart", "teacher")


class Interrupted(Exception):
    pass


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    return dict(images=rng.integers(0, 256, (48, 28, 28, 1), dtype=np.uint8), labels=rng.integers(0, 10, 48),
                pool_images=rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8), pool_labels=rng.integers(0, 10, 32))


def run_scenario(name: str, state_path: Path, interrupt_at_step: int | None = None) -> dict[str, torch.Tensor]:
    """Train tiny-cnn for 2 epochs of 3 batches of 16 (CPU, fp32, seed 0); returns the final weights
    (and the EMA's, prefixed "ema."). `interrupt_at_step` raises Interrupted inside that step, after
    a checkpoint at every step, as a kill would."""
    from data.mixed import MixedBatchLoader, MixedBatchSampler
    from stages import loops
    from stages.losses import ATTACK_LOSS, LOSSES
    from stages.mart import _training_attack
    from stages.models import build_model
    from stages.teacher import augmenter

    d = data()
    mart = name == "mart"
    torch.manual_seed(0)
    model = build_model("tiny-cnn", num_classes=10, in_channels=1)
    ema = loops.WeightEMA(model, 0.9) if mart else None
    sampler = MixedBatchSampler(48, 32 if mart else 0, batch_size=16, unsup_fraction=0.5 if mart else 0.0,
                                epoch_size=48, seed=0)
    loader = MixedBatchLoader(sampler, d["images"], d["labels"], d["pool_images"] if mart else d["images"][:0],
                              d["pool_labels"] if mart else d["labels"][:0], augment=augmenter(True, 28), seed=0)
    optimizer = loops.make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = loops.make_scheduler(optimizer, schedule="cosine", epochs=2, steps_per_epoch=len(sampler))
    loss_fn = functools.partial(LOSSES["mart"], beta=6.0) if mart else loops.natural_loss
    attack = functools.partial(_training_attack, eps=0.1, step_size=0.04, steps=3,
                               loss=ATTACK_LOSS["mart"]) if mart else None
    steps = {"n": 0}

    def counted_loss(*args):
        steps["n"] += 1
        if steps["n"] == interrupt_at_step:
            raise Interrupted
        return loss_fn(*args)

    loops.fit(model=model, sampler=sampler, loader=loader, optimizer=optimizer, scheduler=scheduler, epochs=2,
              loss_fn=counted_loss, attack=attack, device=torch.device("cpu"), precision="fp32", seed=0,
              state_path=state_path, metrics_path=state_path.with_name("metrics.csv"),
              checkpoint_every_s=0.0 if interrupt_at_step else 60.0, ema=ema,
              log=lambda message: None)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ema is not None:
        weights.update({f"ema.{k}": v.detach().clone() for k, v in ema.model.state_dict().items()})
    return weights


def digest(weights: dict[str, torch.Tensor]) -> dict:
    return {k: {"sha256": hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest(),
                "values": v.flatten()[:4].double().tolist(), "sum": float(v.double().sum())}
            for k, v in sorted(weights.items())}


def environment() -> dict:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__.split("+")[0]}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_matches_reference(weights: dict[str, torch.Tensor], scenario: str) -> None:
    reference = json.loads(REFERENCE.read_text())
    expected = reference["scenarios"][scenario]
    got = digest(weights)
    assert got.keys() == expected.keys()
    if reference["environment"] == environment():
        changed = [k for k in expected if got[k]["sha256"] != expected[k]["sha256"]]
        assert not changed, f"{scenario}: weights differ from the reference in {changed}"
    else:  # another kernel set: the same computation up to float rounding
        for k in expected:
            assert np.allclose(got[k]["values"], expected[k]["values"], rtol=1e-4, atol=1e-6), k
            assert got[k]["sum"] == pytest.approx(expected[k]["sum"], rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_weights_equal_the_reference(tmp_path, one_thread, scenario):
    assert_matches_reference(run_scenario(scenario, tmp_path / "state.pt"), scenario)


def test_a_killed_and_resumed_run_equals_the_reference(tmp_path, one_thread):
    with pytest.raises(Interrupted):
        run_scenario("mart", tmp_path / "state.pt", interrupt_at_step=5)  # epoch 2, its second batch
    assert (tmp_path / "state.pt").exists()
    assert_matches_reference(run_scenario("mart", tmp_path / "state.pt"), "mart")


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        scenarios = {s: digest(run_scenario(s, Path(tmp) / f"{s}.pt")) for s in SCENARIOS}
    REFERENCE.write_text(json.dumps({"environment": environment(), "scenarios": scenarios}, indent=1) + "\n")
    print(f"wrote {REFERENCE}")
