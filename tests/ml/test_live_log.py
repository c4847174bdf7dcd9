"""Live curves (ml.live_log): TensorBoard event files and W&B runs written from the training loop."""
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ml import training
from ml.live_log import TENSORBOARD_DIR, open_scalar_log
from pipeline.config import LogConfig, RunConfig
from pipeline.core.distributed import DistInfo
from pipeline.core.errors import UserError

INTERVAL_TAGS = {"train/loss", "train/acc", "train/lr", "train/images_per_s", "train/attack_success"}
EPOCH_TAGS = {"epoch/epoch", "epoch/loss", "epoch/lr", "epoch/train_acc", "epoch/train_adv_acc",
              "epoch/images_per_s", "epoch/seconds"}


def settings(**changes):
    return LogConfig(**{"every_steps": 2, **changes})


def noise_attack(model, x, y, generator):
    """A stand-in for PGD: enough to give the loop adversarial logits to score."""
    noise = torch.rand(x.shape, generator=generator, device=x.device)
    return (x + 0.3 * noise).clamp(0, 1)


def tiny_train(out_dir, live_log, *, loss=training.natural_loss, checkpoint_every_s=60.0):
    """2 epochs of 4 optimizer steps (8 in all) of a tiny model under a stand-in attack."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 2, size=64).astype(np.int64)
    recipe = training.Recipe(arch="tiny-cnn", epochs=2, batch_size=16, epoch_size=64, lr=0.05, momentum=0.9,
                             weight_decay=0.0, schedule="cosine", loss=loss, attack=noise_attack)
    data = training.TrainData(images=images, labels=labels, num_classes=2, class_names=["a", "b"], dataset="t")
    return training.train(recipe, data, run_cfg=RunConfig(device="cpu", checkpoint_every_s=checkpoint_every_s),
                          dist=DistInfo(), out_dir=out_dir, log=lambda message: None, live_log=live_log,
                          run_name="mart-test", run_params={"lr": 0.05})


def read_events(directory: Path) -> EventAccumulator:
    events = EventAccumulator(str(directory))
    events.Reload()
    return events


def steps(events: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def test_training_writes_interval_and_epoch_curves_to_tensorboard(tmp_path):
    rows = tiny_train(tmp_path, settings(tensorboard=True))
    events = read_events(tmp_path / TENSORBOARD_DIR)
    assert set(events.Tags()["scalars"]) == INTERVAL_TAGS | EPOCH_TAGS
    for tag in INTERVAL_TAGS:
        assert steps(events, tag) == [2, 4, 6, 8], tag  # every 2 optimizer steps, across the epoch boundary
    assert steps(events, "epoch/loss") == [4, 8]
    # The epoch points are metrics.csv's rows; the interval means lie in their ranges.
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx([r["loss"] for r in rows])
    assert [e.value for e in events.Scalars("epoch/train_adv_acc")] == pytest.approx(
        [r["train_adv_acc"] for r in rows])
    assert all(0 <= e.value <= 1 for tag in ("train/acc", "train/attack_success") for e in events.Scalars(tag))
    assert all(e.value > 0 for e in events.Scalars("train/images_per_s"))
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 0.05  # the cosine schedule, after the steps taken
    assert not (tmp_path / "wandb").exists()


def test_nothing_is_written_or_imported_when_off(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing either package would now fail
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    tiny_train(tmp_path, settings())
    tiny_train(tmp_path / "none", None)
    assert not list(tmp_path.rglob("*tensorboard*")) and not list(tmp_path.rglob("*wandb*"))
    assert open_scalar_log(tmp_path, settings(tensorboard=True, wandb=True), "x", rank=1) is None  # rank 0 only


def test_a_resumed_run_continues_the_curves_without_duplicates(tmp_path):
    """Killed in epoch 2 after its step-6 write (checkpointed at step 4), then resumed: TensorBoard shows
    each step once, the resumed run's values past the checkpoint."""
    calls = []

    def loss_failing_at_step_7(logits_natural, logits_adv, targets):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt("killed")
        return training.natural_loss(logits_natural, logits_adv, targets)

    with pytest.raises(KeyboardInterrupt):
        tiny_train(tmp_path, settings(tensorboard=True), loss=loss_failing_at_step_7, checkpoint_every_s=1e9)
    assert steps(read_events(tmp_path / TENSORBOARD_DIR), "train/loss") == [2, 4, 6]
    tiny_train(tmp_path, settings(tensorboard=True), checkpoint_every_s=1e9)
    events = read_events(tmp_path / TENSORBOARD_DIR)
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    for tag in INTERVAL_TAGS:
        assert steps(events, tag) == [2, 4, 6, 8], tag
    assert steps(events, "epoch/loss") == [4, 8]


def test_resume_purges_steps_past_the_checkpoint(tmp_path):
    first = open_scalar_log(tmp_path, settings(tensorboard=True), "x")
    for step in range(1, 11):
        first.scalars(step, {"train/loss": 1.0})
    first.close()
    resumed = open_scalar_log(tmp_path, settings(tensorboard=True), "x", start_step=5)
    for step in range(6, 13):
        resumed.scalars(step, {"train/loss": 2.0})
    resumed.close()
    points = read_events(tmp_path / TENSORBOARD_DIR).Scalars("train/loss")
    assert [(p.step, p.value) for p in points] == [(s, 1.0) for s in range(1, 6)] + [(s, 2.0) for s in range(6, 13)]


def test_a_missing_package_is_a_user_error_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r"pip install wandb==0\.31\.0"):
        open_scalar_log(tmp_path, settings(wandb=True), "x")
    with pytest.raises(UserError, match=r"pip install tensorboard==2\.21\.0"):
        open_scalar_log(tmp_path, settings(tensorboard=True), "x")
    with pytest.raises(UserError, match=r"pip install wandb==0\.31\.0.*--set log\.wandb=false"):
        settings(wandb=True).check_installed()  # what the runner asks before any stage runs
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match=r"pip install tensorboard"):
        settings(tensorboard=True).check_installed()
    settings().check_installed()  # both off: nothing needed


def test_wandb_gets_the_run_and_its_scalars(tmp_path, monkeypatch):
    """A stand-in `wandb` module that records the calls (the real one is exercised below)."""
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, dict(values)))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(Settings=lambda **kw: kw, init=lambda **kw: calls.append(("init", kw)) or FakeRun(),
                                 teardown=lambda: calls.append(("teardown",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tiny_train(tmp_path, settings(wandb=True, wandb_project="proj"))
    (_, init), *logs, finish, teardown = calls
    assert init["project"] == "proj" and init["mode"] == "offline" and init["name"] == "mart-test"
    assert init["dir"] == str(tmp_path) and init["config"] == {"lr": 0.05}
    assert (finish, teardown) == (("finish",), ("teardown",))  # the run file complete before close returns
    assert [step for _, step, values in logs if "train/loss" in values] == [2, 4, 6, 8]
    assert [step for _, step, values in logs if "epoch/loss" in values] == [4, 8]
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def _wandb_records(path: Path):
    """The records of a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB holding chunks
    (crc32c: 4 bytes, length: 2, type: 1 = full, 2 = first, 3 = middle, 4 = last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = block - (pos % block)
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_writes_a_run_with_the_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "entry"
    out.mkdir()
    tiny_train(out, settings(wandb=True))
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = [r.history for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
    logged = {(h.step.num, item.key or "/".join(item.nested_key)) for h in history for item in h.item}
    assert {step for step, key in logged if key == "train/loss"} == {2, 4, 6, 8}
    assert {step for step, key in logged if key == "epoch/loss"} == {4, 8}
    assert {key for _, key in logged} >= INTERVAL_TAGS
    assert not (out / TENSORBOARD_DIR).exists()
