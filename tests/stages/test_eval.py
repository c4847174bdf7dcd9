"""The eval stage on a tiny CNN trained in-test (2 classes of 1x8x8 images, dark vs bright by mean
brightness), next to the same model behind an input-rounding wrapper whose input gradient is zero:
the attacks must hurt the honest model and the checks must tell the two apart. About 15 s on one core."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ml import robustness
from ml.checkpoints import save_model
from ml.models import build_model
from pipeline.config import Config
from pipeline.core.distributed import DistInfo
from pipeline.core.errors import UserError
from pipeline.stage import StageInput
from stages import eval as eval_stage

EPS = 0.3  # images whose brightness is within 0.3 of the 0.5 boundary can be flipped
DEVICE = torch.device("cpu")


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC; each image is one brightness b ~ U(0, 1) plus pixel noise, class = b > 0.5."""
    rng = np.random.default_rng(seed)
    brightness = rng.uniform(0, 1, size=(n, 1, 1, 1))
    pixels = np.clip(brightness + rng.uniform(-0.1, 0.1, size=(n, 8, 8, 1)), 0, 1)
    return (pixels * 255).round().astype(np.uint8), (brightness.reshape(n) > 0.5).astype(np.int64)


def to_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~20x slower with two threads contending for two shared cores than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    with torch.random.fork_rng():  # seeded init without moving other tests' global RNG
        torch.manual_seed(0)
        model = build_model("tiny-cnn", num_classes=2, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for step in range(60):
        images, labels = make_images(64, seed=step)
        loss = F.cross_entropy(model(to_nchw(images)), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Rounded(nn.Module):
    """Gradient masking by input quantisation: round() has zero derivative almost everywhere."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


@pytest.fixture(scope="module")
def test_set():
    return make_images(64, seed=1000)


def scorer(model, test_set, n=64, batch_size=32):
    images, labels = test_set
    return robustness.Scorer(model, images[:n], labels[:n], device=DEVICE, batch_size=batch_size, seed=0,
                           log=lambda message: None)


@pytest.mark.parametrize("attack", ["fgsm", "pgd20", "cw30", "autoattack"])
def test_each_attack_lowers_accuracy(trained, test_set, attack):
    score = scorer(trained, test_set, n=32)
    clean = score("clean", 0.0)
    assert clean >= 0.9
    assert score(attack, EPS) < clean - 0.2


def test_checks_flag_the_masked_model_and_pass_the_honest_one(trained, test_set):
    verdicts, checks = {}, []
    for name, model in (("honest", trained), ("masked", Rounded(trained))):
        score = scorer(model, test_set)
        rows = robustness.evaluate_model(score, name, attacks=["clean", "fgsm", "pgd20"], eps=EPS,
                                       sweep=[0.5, 1.0, 2.0])
        checks += robustness.run_checks(score, name, rows, eps=EPS)
        verdicts[name] = {c["check"]: c["passed"] for c in checks if c["model"] == name}
    assert all(verdicts["honest"].values()), verdicts["honest"]
    assert not verdicts["masked"]["input_gradients_nonzero"]
    assert not verdicts["masked"]["large_eps_near_zero"]
    assert verdicts["masked"]["evaluated_in_fp32"]
    lines = []
    robustness.report_checks(checks, lines.append)
    assert any(line.startswith("eval: WARNING check input_gradients_nonzero failed for masked: 0.000 of 64")
               for line in lines), lines
    assert lines[-1] == f"checks: {sum(c['passed'] for c in checks)}/14 passed"


def test_results_rows_and_monotone_sweep(trained, test_set):
    score = scorer(trained, test_set)
    rows = robustness.evaluate_model(score, "mart", attacks=["clean", "pgd20"], eps=EPS, sweep=[0.25, 0.5, 1.0, 2.0])
    frame = pd.DataFrame(rows)
    assert list(frame.columns) == ["model", "split", "attack", "eps", "accuracy", "n"]
    assert frame["accuracy"].between(0, 1).all() and (frame["n"] == 64).all()
    sweep = frame[frame["attack"] == robustness.SWEEP_ATTACK]
    assert sweep["eps"].tolist() == pytest.approx([0.0, 0.075, 0.15, 0.3, 0.6])
    assert (np.diff(sweep["accuracy"]) <= 0.01).all()
    # The sweep point at eps is the headline PGD-20 measurement, run once.
    assert sweep.loc[sweep["eps"] == EPS, "accuracy"].item() == frame.loc[frame["attack"] == "pgd20", "accuracy"].item()
    assert sweep["accuracy"].iloc[0] == frame.loc[frame["attack"] == "clean", "accuracy"].item()


def test_plot_is_a_png(tmp_path):
    rows = [{"model": "mart", "split": "test", "attack": a, "eps": e, "accuracy": acc, "n": 8}
            for a, e, acc in [("clean", 0.0, 1.0), ("pgd20", 0.1, 0.5), ("pgd20-sweep", 0.0, 1.0),
                              ("pgd20-sweep", 0.1, 0.5), ("pgd20-sweep", 0.2, 0.1)]]
    robustness.plot_robustness(tmp_path / "robustness.png", rows, eps=0.1)
    assert (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["robustness.png"]  # no temp file left behind


def test_unknown_names_are_user_errors():
    with pytest.raises(UserError, match="pgdN"):
        robustness.build_attack("pgd", 0.1)
    with pytest.raises(UserError, match="pgdN"):
        robustness.build_attack("deepfool", 0.1)
    with pytest.raises(UserError, match="mart-last"):
        eval_stage.model_path({"mart": "x"}, "student")
    assert robustness.build_attack("clean", 0.1) is None


def test_stage_writes_its_outputs(trained, test_set, tmp_path):
    mart_dir = tmp_path / "mart"
    for filename in ("model.pt", "last.pt"):
        save_model(mart_dir / filename, trained, arch="tiny-cnn", num_classes=2, in_channels=1,
                   mean=[0.5], std=[0.25])
    config = Config()
    config.run.device = "cpu"
    config.eval.models = ["mart", "mart-last"]
    config.eval.attacks = ["clean", "fgsm", "pgd20"]
    config.eval.n, config.eval.eps, config.eval.sweep, config.eval.batch_size = 48, 0.0, [0.5, 1.0], 32
    config.mart.epsilon = EPS
    images, labels = test_set
    lines = []
    labeled = SimpleNamespace(test_images=images, test_labels=labels, class_names=("dark", "bright"), num_classes=2)
    ctx = SimpleNamespace(  # the config as the runner gives it: only what eval declares it reads
        config=eval_stage.STAGE.view(config), out_dir=tmp_path / "eval", inputs={"mart": StageInput(mart_dir, "test")},
        log=lines.append,
        dist=DistInfo(), sources={"labeled": SimpleNamespace(dataset=labeled)})
    ctx.out_dir.mkdir()
    eval_stage.run(ctx)

    assert sorted(p.name for p in ctx.out_dir.iterdir()) == sorted(eval_stage.OUTPUTS)
    results = pd.read_csv(ctx.out_dir / "results.csv")
    assert set(results["model"]) == {"mart", "mart-last"} and (results["n"] == 48).all()
    assert set(results["attack"]) == {"clean", "fgsm", "pgd20"}  # accuracies only: the curve has its own file
    curve = pd.read_csv(ctx.out_dir / "robustness.csv")
    assert set(curve["attack"]) == {robustness.SWEEP_ATTACK} and len(curve) == 2 * 3  # eps 0 plus 2 sweep points
    assert results.loc[results["attack"] == "pgd20", "eps"].tolist() == [EPS, EPS]
    checks = pd.read_csv(ctx.out_dir / "checks.csv")
    assert list(checks.columns) == robustness.CHECK_COLUMNS and len(checks) == 14
    assert checks["passed"].all(), checks
    assert "checks: 14/14 passed" in lines
    assert (ctx.out_dir / "robustness.png").read_bytes()[:4] == b"\x89PNG"

    config.eval.checks = False
    eval_stage.run(ctx)
    assert len(pd.read_csv(ctx.out_dir / "checks.csv")) == 0


def test_the_fp32_check_fails_for_a_model_evaluated_under_autocast(trained, test_set):
    verdicts = {}
    contexts = (("fp32", torch.autocast("cpu", enabled=False)), ("bf16", torch.autocast("cpu", torch.bfloat16)))
    for name, context in contexts:
        score = scorer(trained, test_set)
        with context:
            rows = robustness.evaluate_model(score, name, attacks=["clean", "pgd20"], eps=EPS, sweep=[])
            checks = robustness.run_checks(score, name, rows, eps=EPS)
        verdicts[name] = next(c for c in checks if c["check"] == "evaluated_in_fp32")
    assert verdicts["fp32"]["passed"] and verdicts["fp32"]["detail"].startswith("logits float32")
    assert not verdicts["bf16"]["passed"] and "bfloat16" in verdicts["bf16"]["detail"]


def test_eval_models_can_name_a_checkpoint_file(trained, test_set, tmp_path):
    """A foreign checkpoint (here a plain state dict) is imported as mart.arch and scored like our own;
    its digest is an input of the stage."""
    theirs = tmp_path / "theirs.pt"
    torch.save(trained.state_dict(), theirs)
    config = Config()
    config.run.device = "cpu"
    config.mart.arch, config.mart.epsilon = "tiny-cnn", EPS
    config.eval.models, config.eval.attacks = [str(theirs)], ["clean", "pgd20"]
    config.eval.sweep, config.eval.n = [], 32
    assert [s.name for s in eval_stage.STAGE.sources(config)] == ["labeled", f"model {theirs}"]
    assert eval_stage.STAGE.upstream(config) == ()
    images, labels = test_set
    labeled = SimpleNamespace(test_images=images, test_labels=labels, class_names=("dark", "bright"), num_classes=2)
    ctx = SimpleNamespace(config=eval_stage.STAGE.view(config), out_dir=tmp_path / "eval", inputs={},
                          log=lambda line: None,
                          dist=DistInfo(), sources={"labeled": SimpleNamespace(dataset=labeled)})
    ctx.out_dir.mkdir()
    eval_stage.run(ctx)
    results = pd.read_csv(ctx.out_dir / "results.csv")
    assert set(results["model"]) == {str(theirs)} and set(results["attack"]) == {"clean", "pgd20"}
    ours = robustness.Scorer(trained, images[:32], labels[:32], device=torch.device("cpu"), batch_size=32, seed=0,
                             log=lambda line: None, desc="ours")
    assert results.loc[results["attack"] == "clean", "accuracy"].item() == ours("clean", 0.0)
