"""AutoAttack run part by part (ml.robustness.run_autoattack) against pyautoattack's own
run_standard_evaluation, on a fixed linear 10-class model over 8x8 images (seconds on one core)."""
import pytest
import torch

from ml import robustness


@pytest.fixture(scope="module")
def linear_model_and_images():
    """A linear classifier whose clean accuracy is 100% on its own images, with margins spread so that
    some images fall to each eps tried and some survive."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(10, 64, generator=g))
        model[1].bias.zero_()
    model.eval()
    x = torch.rand(16, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _cheaper(adversary):
    """Fewer iterations and queries for every part (the same on both sides of a comparison): the test is
    about running the parts in the package's order, batches and seeds, and 2 shared cores must finish it
    in seconds."""
    adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = 20
    adversary.fab.n_iter = 10
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = 3
    adversary.square.n_queries = 100
    return adversary


@pytest.mark.parametrize("name, batch_size", [("autoattack", 5), ("autoattack-fast", 16), ("apgd-t", 5)])
def test_part_by_part_equals_run_standard_evaluation(linear_model_and_images, monkeypatch, name, batch_size):
    from pyautoattack import AutoAttack

    model, x, y = linear_model_and_images
    eps = 0.03
    lines = []
    adversary = robustness._adversary
    monkeypatch.setattr(robustness, "_adversary", lambda *args: _cheaper(adversary(*args)))
    x_adv, robust = robustness.run_autoattack(model, x, y, name=name, eps=eps, seed=0, batch_size=batch_size,
                                              log=lines.append, progress=True)

    if name == "apgd-t":
        reference = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=[name], seed=0)
    else:
        reference = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0)
        if name == "autoattack-fast":
            reference.attacks_to_run = ["apgd-ce", "apgd-t"]
    reference.verbose = False
    _cheaper(reference)
    expected, _ = reference.run_standard_evaluation(x, y, batch_size=batch_size)
    with torch.no_grad():
        expected_robust = model(expected).argmax(1) == y
    assert 0 < int(expected_robust.sum()) < len(y)  # the comparison has robust and fooled images
    assert torch.equal(robust, expected_robust)
    assert torch.equal(x_adv, expected)
    # One line per part run, each with its robust accuracy.
    parts = {"autoattack": ["apgd-ce", "apgd-t", "fab-t", "square"], "autoattack-fast": ["apgd-ce", "apgd-t"],
             "apgd-t": ["apgd-t"]}[name]
    assert [line.split(":")[1].strip() for line in lines] == parts[:len(lines)] and lines
    assert lines[-1].startswith(f"eval: {parts[len(lines) - 1]}: robust {robust.float().mean().item():.4f} of 16")


def test_the_fast_suite_never_scores_below_the_standard_one(linear_model_and_images, monkeypatch):
    model, x, y = linear_model_and_images
    adversary = robustness._adversary
    monkeypatch.setattr(robustness, "_adversary", lambda *args: _cheaper(adversary(*args)))
    images = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    score = robustness.Scorer(model, images, y.numpy(), device=torch.device("cpu"), batch_size=8, seed=0,
                              log=lambda message: None)
    fast, standard = score("autoattack-fast", 0.05), score("autoattack", 0.05)
    assert standard <= fast <= score("clean", 0.0)
    assert score.output_dtypes == {torch.float32}


def test_progress_bars_name_each_part(linear_model_and_images, monkeypatch, capsys):
    model, x, y = linear_model_and_images
    adversary = robustness._adversary
    monkeypatch.setattr(robustness, "_adversary", lambda *args: _cheaper(adversary(*args)))
    robustness.run_autoattack(model, x, y, name="autoattack-fast", eps=0.03, seed=0, batch_size=12,
                              log=lambda message: None, progress=True, desc="mart")
    err = capsys.readouterr().err
    assert "mart apgd-ce" in err and "mart apgd-t" in err and "robust " in err and "img" in err


def test_build_attack_takes_the_fast_suite_per_batch(linear_model_and_images, monkeypatch):
    model, x, y = linear_model_and_images
    adversary = robustness._adversary
    monkeypatch.setattr(robustness, "_adversary", lambda *args: _cheaper(adversary(*args)))
    attack = robustness.build_attack("autoattack-fast", 0.03, seed=0, log=lambda message: None)
    x_adv = attack(model, x, y, None)
    assert (x_adv - x).abs().max() <= 0.03 + 1e-6
    expected, _ = robustness.run_autoattack(model, x, y, name="autoattack-fast", eps=0.03, seed=0,
                                            batch_size=len(x), progress=False)
    assert torch.equal(x_adv, expected)
