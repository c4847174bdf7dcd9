import numpy as np
import pytest
import torch

from pipeline.config import RunConfig
from pipeline.distributed import DistInfo
from pipeline.errors import UserError
from stages import devices, optim, training


def tiny_run(tmp_path, loss_fn):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 2, size=64).astype(np.int64)
    recipe = training.Recipe(arch="tiny-cnn", epochs=2, batch_size=16, epoch_size=64, lr=0.05, momentum=0.9,
                             weight_decay=0.0, schedule="cosine", loss=loss_fn)
    data = training.TrainData(images=images, labels=labels, num_classes=2, class_names=["a", "b"], dataset="t")
    return training.train(recipe, data, run_cfg=RunConfig(device="cpu"), dist=DistInfo(), out_dir=tmp_path,
                          log=lambda message: None)


def test_train_trains_and_writes_metrics(tmp_path):
    rows = tiny_run(tmp_path, training.natural_loss)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 8
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "train_state.pt").exists()
    assert (tmp_path / "model.pt").exists() and not (tmp_path / "last.pt").exists()


def test_a_diverged_loss_stops_with_a_user_error(tmp_path):
    def nan_loss(logits_natural, logits_adv, targets):
        return training.natural_loss(logits_natural, logits_adv, targets) * float("nan")
    with pytest.raises(UserError, match="diverged"):
        tiny_run(tmp_path, nan_loss)
    assert not (tmp_path / "metrics.csv").exists()


def test_piecewise_schedule_decays_after_the_milestone_epochs():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = optim.make_scheduler(optimizer, schedule="piecewise", epochs=4, steps_per_epoch=10, milestones=[2, 3])
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[19] == 1.0 and lrs[20] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.01)


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    cpu = torch.device("cpu")
    assert devices.resolve_precision("fp32", cpu) == "fp32" and devices.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert devices.resolve_precision("auto", cpu) == "fp32"
    assert isinstance(devices.autocast(cpu, "auto"), type(devices.autocast(cpu, "fp32")))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert devices.resolve_precision("auto", cpu) == "bf16"
    with devices.autocast(cpu, "auto"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
