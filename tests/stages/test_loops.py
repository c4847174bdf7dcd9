import numpy as np
import pytest
import torch

from data.mixed import MixedBatchLoader, MixedBatchSampler
from pipeline.errors import UserError
from stages import loops
from stages.models import build_model


def tiny_setup(tmp_path, loss_fn):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 2, size=64).astype(np.int64)
    model = build_model("tiny-cnn", num_classes=2, in_channels=1)
    sampler = MixedBatchSampler(64, 0, batch_size=16, unsup_fraction=0.0, epoch_size=64, seed=0)
    loader = MixedBatchLoader(sampler, images, labels, images[:0], labels[:0], seed=0)
    optimizer = loops.make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=0.0)
    scheduler = loops.make_scheduler(optimizer, schedule="cosine", epochs=2, steps_per_epoch=len(sampler))
    return dict(model=model, sampler=sampler, loader=loader, optimizer=optimizer, scheduler=scheduler, epochs=2,
                loss_fn=loss_fn, attack=None, device=torch.device("cpu"), precision="fp32", seed=0,
                state_path=tmp_path / "state.pt", metrics_path=tmp_path / "metrics.csv", checkpoint_every_s=60.0,
                log=lambda message: None)


def test_fit_trains_and_writes_metrics(tmp_path):
    rows = loops.fit(**tiny_setup(tmp_path, loops.natural_loss))
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 8
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "state.pt").exists()


def test_a_diverged_loss_stops_with_a_user_error(tmp_path):
    def nan_loss(logits_natural, logits_adv, targets):
        return loops.natural_loss(logits_natural, logits_adv, targets) * float("nan")
    with pytest.raises(UserError, match="diverged"):
        loops.fit(**tiny_setup(tmp_path, nan_loss))
    assert not (tmp_path / "metrics.csv").exists()


def test_piecewise_schedule_decays_after_the_milestone_epochs():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = loops.make_scheduler(optimizer, schedule="piecewise", epochs=4, steps_per_epoch=10, milestones=[2, 3])
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[19] == 1.0 and lrs[20] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.01)


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    cpu = torch.device("cpu")
    assert loops.resolve_precision("fp32", cpu) == "fp32" and loops.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert loops.resolve_precision("auto", cpu) == "fp32"
    assert isinstance(loops.autocast(cpu, "auto"), type(loops.autocast(cpu, "fp32")))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert loops.resolve_precision("auto", cpu) == "bf16"
    with loops.autocast(cpu, "auto"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
