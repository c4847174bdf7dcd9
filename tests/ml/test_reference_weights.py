"""The training loop's weights after a few steps, pinned against a reference computed by the code as it
was before the training loop was restructured and sped up (issue 14: "identical weights to today's for
the same seed"): a MART run with pool, augmentation and EMA, a natural (teacher) run, and the MART run
killed mid-epoch and resumed, which must land on the uninterrupted run's weights.

The reference holds a sha256 per tensor. Float results depend on the CPU's kernel set (oneDNN picks
AVX2 or AVX-512 code) and on the thread count, so the comparison is exact (bitwise) on the kernel set
the reference was made with, one thread, and close (rtol 1e-4) elsewhere.

Regenerate (only when a change of results is intended): python -m tests.ml.test_reference_weights
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


def run_scenario(name: str, out_dir: Path, interrupt_at_step: int | None = None) -> dict[str, torch.Tensor]:
    """Train tiny-cnn for 2 epochs of 3 batches of 16 (CPU, fp32, seed 0) through ml.training.train;
    returns the final weights (and the EMA's, prefixed "ema."). `interrupt_at_step` raises Interrupted
    inside that step, after a checkpoint at every step, as a kill would."""
    from ml import training
    from ml.attacks import training_attack
    from ml.losses import LOSSES
    from pipeline.config import RunConfig
    from pipeline.core.distributed import DistInfo

    d = data()
    mart = name == "mart"
    loss_fn = functools.partial(LOSSES["mart"], beta=6.0) if mart else training.natural_loss
    steps = {"n": 0}

    def counted_loss(*args):
        steps["n"] += 1
        if steps["n"] == interrupt_at_step:
            raise Interrupted
        return loss_fn(*args)

    recipe = training.Recipe(
        arch="tiny-cnn", epochs=2, batch_size=16, epoch_size=48, lr=0.05, momentum=0.9, weight_decay=5e-4,
        schedule="cosine", loss=counted_loss, augment=True,
        attack=training_attack("mart", eps=0.1, step_size=0.04, steps=3) if mart else None,
        unsup_fraction=0.5 if mart else 0.0, ema_decay=0.9 if mart else 0.0)
    train_data = training.TrainData(
        images=d["images"], labels=d["labels"], num_classes=10, class_names=[str(k) for k in range(10)],
        dataset="synthetic", pool_images=d["pool_images"] if mart else None,
        pool_labels=d["pool_labels"] if mart else None)
    run_cfg = RunConfig(device="cpu", precision="fp32", seed=0, checkpoint_every_s=0.0 if interrupt_at_step else 60.0)
    out_dir.mkdir(exist_ok=True)
    training.train(recipe, train_data, run_cfg=run_cfg, dist=DistInfo(), out_dir=out_dir, log=lambda message: None)
    state = torch.load(out_dir / training.STATE_FILE, weights_only=True)  # the epoch-end checkpoint
    weights = dict(state["model"])
    if state["ema"] is not None:
        weights.update({f"ema.{k}": v for k, v in state["ema"]["model"].items()})
    return weights


def digest(weights: dict[str, torch.Tensor]) -> dict:
    return {k: {"sha256": hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest(),
                "values": v.flatten()[:4].double().tolist(), "sum": float(v.double().sum())}
            for k, v in sorted(weights.items())}


def environment() -> dict:
    # oneDNN picks its fp32 kernels by ISA, and AMX machines get other kernels than AVX-512-only ones
    # although torch reports "AVX512" on both, so AMX is part of the kernel set.
    with open("/proc/cpuinfo") as cpuinfo:
        amx = " amx_tile" in cpuinfo.read()
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "amx": amx,
            "torch": torch.__version__.split("+")[0]}


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
    assert_matches_reference(run_scenario(scenario, tmp_path / "run"), scenario)


def test_a_killed_and_resumed_run_equals_the_reference(tmp_path, one_thread):
    with pytest.raises(Interrupted):
        run_scenario("mart", tmp_path / "run", interrupt_at_step=5)  # epoch 2, its second batch
    assert (tmp_path / "run" / "train_state.pt").exists()
    assert_matches_reference(run_scenario("mart", tmp_path / "run"), "mart")


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        scenarios = {s: digest(run_scenario(s, Path(tmp) / s)) for s in SCENARIOS}
    REFERENCE.write_text(json.dumps({"environment": environment(), "scenarios": scenarios}, indent=1) + "\n")
    print(f"wrote {REFERENCE}")
