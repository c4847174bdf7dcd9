import numpy as np
import pytest
import torch

from ml import devices, optim, training
from pipeline.config import RunConfig
from pipeline.core.distributed import DistInfo
from pipeline.core.errors import UserError


def step_recipe(loss, attack=None, **options) -> training.Recipe:
    """A Recipe for train_one_epoch alone, which applies its loss, attack, targets and CutMix; the set-up
    fields (arch, schedule, ...) are set_up's and unused here."""
    return training.Recipe(arch="tiny-cnn", epochs=1, batch_size=4, epoch_size=8, lr=0.1, momentum=0.0,
                           weight_decay=0.0, schedule="constant", loss=loss, attack=attack, **options)


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


@pytest.mark.parametrize("cap, native", [("AVX2", False), ("avx512_core_vnni", False), ("AVX2_VNNI_2", False),
                                         ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True), ("ALL", True)])
def test_auto_precision_follows_a_onednn_isa_cap(monkeypatch, cap, native):
    """ONEDNN_MAX_CPU_ISA below AVX-512 BF16 keeps oneDNN off the bf16 instructions the CPU has, so `auto`
    must take fp32 there (the way to run the AVX2-only path on an AMX machine)."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert devices.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", cap)
    assert devices.native_bf16(cpu) is native


class ModeSpy(torch.nn.Module):
    """Records the mode of every forward through it."""

    def __init__(self):
        super().__init__()
        self.modes = []
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        self.modes.append("train" if self.training else "eval")
        return self.linear(x.flatten(1))


def test_the_attack_runs_in_eval_mode_and_the_loss_in_train_mode():
    from data.mixed import MixedBatchLoader, MixedBatchSampler

    model, calls = ModeSpy(), []

    def attack(m, x, y, generator):
        m(x)
        calls.append(("attack", m.modes[-1]))
        return x + 0.01

    def loss(logits_natural, logits_adv, y):
        calls.append(("loss", model.modes[-2], model.modes[-1]))
        return torch.nn.functional.cross_entropy(logits_natural, y) + torch.nn.functional.cross_entropy(logits_adv, y)

    sampler = MixedBatchSampler(8, 0, batch_size=4, unsup_fraction=0.0, epoch_size=8, seed=0)
    images = np.zeros((8, 2, 2, 1), np.uint8)
    optimizer = optim.make_optimizer(model, lr=0.1, momentum=0.0, weight_decay=0.0)
    t = training.Training(model=model, optimizer=optimizer, scheduler=optim.make_scheduler(
        optimizer, schedule="constant", epochs=1, steps_per_epoch=2), loader=MixedBatchLoader(
        sampler, images, np.zeros(8, np.int64), None, None, prefetch=0), recipe=step_recipe(loss, attack),
        device=torch.device("cpu"), precision="fp32", seed=0)
    sampler.set_epoch(0)
    training.train_one_epoch(t, 0, progress_bar=False)
    assert calls == [("attack", "eval"), ("loss", "train", "train")] * 2
    assert model.modes == ["eval", "train", "train"] * 2


def test_weight_ema_warms_up_then_averages_and_copies_buffers():
    model = torch.nn.BatchNorm1d(2)
    ema = optim.WeightEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(3.0)  # the EMA started at 1.0
        model.running_mean.fill_(7.0)
    ema.update(model)  # warm-up: decay_1 = min(0.5, 2 / 11)
    d1 = 2 / 11
    assert torch.allclose(ema.model.weight, torch.full((2,), d1 * 1.0 + (1 - d1) * 3.0))
    assert torch.equal(ema.model.running_mean, torch.full((2,), 7.0))  # copied, not averaged
    for _ in range(20):
        ema.update(model)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.fill_(5.0)
    ema.update(model)  # past the warm-up: decay 0.5
    assert torch.allclose(ema.model.weight, 0.5 * before + 0.5 * 5.0)
    assert not ema.model.weight.requires_grad and not ema.model.training
    restored = optim.WeightEMA(torch.nn.BatchNorm1d(2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 22 and torch.equal(restored.model.weight, ema.model.weight)


def test_validation_picks_the_best_epoch_as_model_pt(tmp_path, monkeypatch):
    """mart.val_size: model.pt = the epoch with the best validation PGD accuracy, last.pt = the last epoch."""
    scripted = iter([0.2, 0.5, 0.3])  # validation PGD accuracy of epochs 1, 2, 3
    weights = []

    def fake_evaluate(model, images, labels, *, attack=None, **kwargs):
        if attack is None:
            return 0.9
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 2, size=40).astype(np.int64)
    recipe = training.Recipe(arch="tiny-cnn", epochs=3, batch_size=16, epoch_size=32, lr=0.05, momentum=0.9,
                             weight_decay=0.0, schedule="constant", ema_decay=0.9, select_attack=lambda *a: a[1])
    data = training.TrainData(images=images[:32], labels=labels[:32], num_classes=2, class_names=["a", "b"],
                              dataset="t", val_images=images[32:], val_labels=labels[32:])
    rows = training.train(recipe, data, run_cfg=RunConfig(device="cpu"), dist=DistInfo(), out_dir=tmp_path,
                          log=lambda message: None)
    assert [r["val_pgd_acc"] for r in rows] == [0.2, 0.5, 0.3]
    best = torch.load(tmp_path / "model.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert best["best_epoch"] == 2 and last["best_epoch"] == 3
    for key, value in best["state_dict"].items():  # the EMA weights scored in epoch 2
        assert torch.equal(value, weights[1][key]), key
    assert any(not torch.equal(v, last["state_dict"][k]) for k, v in best["state_dict"].items())


def _official_step(model, x, y, *, method, eps, step_size, steps, beta, noise):
    """One training step of the MART / TRADES algorithm transcribed from the papers' published code
    (YisenWang/MART mart.py, yaodongyu/TRADES and yaircarmon/semisup-adv trades.py): returns the loss."""
    import torch.nn.functional as F

    model.eval()
    if method == "trades":
        p_natural = F.softmax(model(x), dim=1).detach()
    x_adv = x.detach() + 0.001 * noise  # not clamped: the first gradient is taken here
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            if method == "mart":
                objective = F.cross_entropy(model(x_adv), y)
            else:
                objective = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_natural, reduction="sum")
        grad = torch.autograd.grad(objective, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    logits, logits_adv = model(x), model(x_adv)
    batch_size = len(x)
    if method == "trades":
        return F.cross_entropy(logits, y) + beta * F.kl_div(
            F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="sum") / batch_size
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none")
    return loss_adv + beta * (1.0 / batch_size) * torch.sum(torch.sum(kl, dim=1) * (1.0000001 - true_probs))


@pytest.mark.parametrize("method", ["mart", "trades"])
def test_one_step_equals_the_official_algorithm_on_pixels_at_0_and_1(method):
    """The training attack starts at x + 0.001 N(0, 1) unclamped, as the official code does: on images with
    exact zeros and ones (Fashion-MNIST's background) the loss and every parameter gradient of one
    training step equal the transcription's, bit for bit."""
    import copy
    import functools

    from ml.attacks import training_attack
    from ml.losses import LOSSES
    from ml.models import build_model
    from ml.resume import seed_from

    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 1, 12, 12, generator=g)
    x[:, :, :4] = 0.0
    x[:, :, -3:] = 1.0
    y = torch.randint(0, 10, (16,), generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("tiny-cnn", num_classes=10, in_channels=1)
    reference = copy.deepcopy(model)
    kw = dict(eps=0.1, step_size=0.03, steps=3)
    losses = []

    def loss(*args):
        losses.append(functools.partial(LOSSES[method], beta=6.0)(*args))
        return losses[-1]

    optimizer = optim.make_optimizer(model, lr=0.0, momentum=0.0, weight_decay=0.0)
    t = training.Training(model=model, optimizer=optimizer, scheduler=optim.make_scheduler(
        optimizer, schedule="constant", epochs=1, steps_per_epoch=1), loader=[(x, y)],
        recipe=step_recipe(loss, training_attack(method, **kw)), device=torch.device("cpu"), precision="fp32", seed=7)
    training.train_one_epoch(t, 0, progress_bar=False)

    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed_from(7, 0, 0, 0)))
    expected = _official_step(reference, x, y, method=method, beta=6.0, noise=noise, **kw)
    expected.backward()
    assert torch.equal(losses[0], expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


def _options_run(recipe_targets, pool_cutmix, labeled=12, pool=12):
    """One epoch of 3 batches of 8 (half from the pool) through train_one_epoch with a spy attack and
    loss; returns what each received."""
    from data.mixed import MixedBatchLoader, MixedBatchSampler
    from ml.losses import Targets

    rng = np.random.default_rng(0)
    images = np.full((labeled, 4, 4, 1), 0, np.uint8)  # labeled images all black, pool images all white
    pool_images = np.full((pool, 4, 4, 1), 255, np.uint8)
    sampler = MixedBatchSampler(labeled, pool, batch_size=8, unsup_fraction=0.5, epoch_size=24, seed=0)
    loader = MixedBatchLoader(sampler, images, rng.integers(0, 3, labeled), pool_images, rng.integers(0, 3, pool),
                              prefetch=0, with_source=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    seen = []

    def attack(m, x, targets, generator):
        seen.append((x.clone(), targets))
        return x

    def loss(logits_natural, logits_adv, targets):
        labels = targets.labels if isinstance(targets, Targets) else targets
        return torch.nn.functional.cross_entropy(logits_adv, labels)

    optimizer = optim.make_optimizer(model, lr=0.1, momentum=0.0, weight_decay=0.0)
    t = training.Training(model=model, optimizer=optimizer, scheduler=optim.make_scheduler(
        optimizer, schedule="constant", epochs=1, steps_per_epoch=3), loader=loader,
        recipe=step_recipe(loss, attack, targets=recipe_targets, pool_cutmix=pool_cutmix),
        device=torch.device("cpu"), precision="fp32", seed=0)
    sampler.set_epoch(0)
    training.train_one_epoch(t, 0, progress_bar=False)
    return seen


def test_without_options_the_attack_and_loss_get_plain_labels():
    from ml.losses import TargetRecipe

    for _x, targets in _options_run(TargetRecipe(), 0.0):
        assert isinstance(targets, torch.Tensor) and targets.dtype == torch.int64


def test_options_apply_per_source_and_cutmix_stays_in_the_pool():
    from ml.losses import TargetRecipe

    seen = _options_run(TargetRecipe(label_smoothing=0.1, pool_label_smoothing=0.3, pool_loss_weight=0.5), 1.0)
    for x, targets in seen:
        white = (x == 1.0).flatten(1).all(1)  # a pool image, untouched or with a box from another pool image
        smoothing, weights = targets.smoothing.tolist(), targets.weights.tolist()
        from_pool = [s == pytest.approx(0.3) for s in smoothing]
        assert sum(from_pool) == 4  # half the batch of 8
        assert all(s == pytest.approx(0.1) for s, p in zip(smoothing, from_pool) if not p)
        assert weights == [0.5 if p else 1.0 for p in from_pool]
        assert white.tolist() == from_pool  # CutMix pasted pool into pool only: labeled stay black
        assert (x[~white] == 0).all()
        share = targets.mixed_share
        assert (share[~white] == 0).all() and (share[white] > 0).any()
