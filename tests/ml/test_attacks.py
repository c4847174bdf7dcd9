"""PGD family on a tiny CNN trained in-test on a separable toy problem (2 classes of 1x8x8 images,
dark vs bright); the whole file runs in a few seconds on one CPU core."""
import pytest
import torch

from ml.attacks import cw_linf, fgsm, input_gradient_norms, pgd_linf
from ml.models import build_model

EPS = 0.3  # larger than the 0.25 gap from either class's mean brightness to the boundary


def make_data(n, seed):
    """Class 0 pixels in [0, 0.5), class 1 in [0.5, 1): the mean brightness decides the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = (torch.rand(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()) / 2
    return x, y


@pytest.fixture(scope="module")
def trained():
    with torch.random.fork_rng():  # seeded init without moving other tests' global RNG
        torch.manual_seed(0)
        model = build_model("tiny-cnn", num_classes=2, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(50):
        x, y = make_data(64, seed=step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    x, y = make_data(128, seed=1000)
    return model, x, y


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def all_attacks(model, x, y, eps):
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    step = eps / 4
    return {
        "pgd-ce": pgd_linf(model, x, y, eps=eps, step_size=step, steps=10, generator=g()),
        "pgd-kl": pgd_linf(model, x, y, eps=eps, step_size=step, steps=10, loss="kl",
                           random_start="normal", generator=g()),
        "pgd-cw-nostart": pgd_linf(model, x, y, eps=eps, step_size=step, steps=10, loss="cw",
                                   random_start=None),
        "fgsm": fgsm(model, x, y, eps=eps),
        "cw": cw_linf(model, x, y, eps=eps, step_size=step, steps=10, generator=g()),
    }


def test_attacks_lower_accuracy(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    assert clean >= 0.95
    for name, x_adv in all_attacks(model, x, y, EPS).items():
        assert accuracy(model, x_adv, y) <= clean, name
    pgd = accuracy(model, pgd_linf(model, x, y, eps=EPS, step_size=EPS / 4, steps=10), y)
    assert pgd <= 0.5 * clean
    # A ball too small to cross the boundary leaves the model right on most examples.
    assert accuracy(model, pgd_linf(model, x, y, eps=0.02, step_size=0.005, steps=5), y) >= 0.8


@pytest.mark.parametrize("eps", [0.0, 0.05, EPS])
def test_outputs_stay_in_the_ball_and_the_image_range(trained, eps):
    model, x, y = trained
    x = x.clone()
    x[:8] = 0.0  # pixels at the range's edges, where the ball and [0, 1] disagree
    x[8:16] = 1.0
    for name, x_adv in all_attacks(model, x, y, eps).items():
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype, name
        assert not x_adv.requires_grad, name
        assert (x_adv - x).abs().max().item() <= eps + 1e-6, name
        assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0, name
    # Gradients were taken w.r.t. the input only.
    assert all(p.grad is None for p in model.parameters())


def test_seeded_generator_makes_attacks_reproducible(trained):
    model, x, y = trained
    kw = dict(eps=0.1, step_size=0.02, steps=3)
    a = pgd_linf(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    b = pgd_linf(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b)
    start5 = pgd_linf(model, x, y, eps=0.1, step_size=0.02, steps=0,
                      generator=torch.Generator().manual_seed(5))
    start6 = pgd_linf(model, x, y, eps=0.1, step_size=0.02, steps=0,
                      generator=torch.Generator().manual_seed(6))
    assert not torch.equal(start5, start6)
    c = cw_linf(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    d = cw_linf(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(c, d)


def test_no_steps_and_no_start_returns_x(trained):
    model, x, y = trained
    assert torch.equal(pgd_linf(model, x, y, eps=0.1, step_size=0.01, steps=0, random_start=None), x)


def test_normal_start_is_small(trained):
    model, x, y = trained
    x = x.clamp(0.1, 0.9)  # away from the edges so clamping does not hide the noise
    x0 = pgd_linf(model, x, y, eps=0.1, step_size=0.01, steps=0, random_start="normal",
                  init_std=0.001, generator=torch.Generator().manual_seed(0))
    delta = (x0 - x).abs()
    assert 0 < delta.max().item() < 0.01
    assert delta.mean().item() == pytest.approx(0.001 * (2 / torch.pi) ** 0.5, rel=0.2)


def test_kl_attack_computes_natural_logits_when_not_given(trained):
    model, x, y = trained
    kw = dict(eps=0.1, step_size=0.02, steps=3, loss="kl", random_start="normal")
    with torch.no_grad():
        logits = model(x)
    given = pgd_linf(model, x, y, logits_natural=logits, generator=torch.Generator().manual_seed(1), **kw)
    computed = pgd_linf(model, x, y, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(given, computed)
    assert not torch.equal(given, x)


def test_attacks_work_inside_no_grad(trained):
    model, x, y = trained
    with torch.no_grad():
        x_adv = pgd_linf(model, x, y, eps=EPS, step_size=EPS / 4, steps=5)
        norms = input_gradient_norms(model, x, y)
    assert not torch.equal(x_adv, x)
    assert norms.shape == (len(x),)


def test_input_gradient_norms_are_positive(trained):
    model, x, y = trained
    norms = input_gradient_norms(model, x, y)
    assert norms.shape == (len(x),) and not norms.requires_grad
    assert (norms > 0).all()
    # Per example: the norm of one example does not depend on the rest of the batch.
    assert norms[:4] == pytest.approx(input_gradient_norms(model, x[:4], y[:4]), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_unknown_options_are_refused(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="attack loss"):
        pgd_linf(model, x, y, eps=0.1, step_size=0.01, steps=1, loss="hinge")
    with pytest.raises(ValueError, match="random_start"):
        pgd_linf(model, x, y, eps=0.1, step_size=0.01, steps=1, random_start="gaussian")


@pytest.mark.parametrize("method, start", [("mart", "normal"), ("trades", "normal"), ("pgd-at", "uniform")])
def test_each_methods_training_attack_starts_where_its_paper_does(method, start):
    """MART/TRADES: x + 0.001 N(0, 1) (their official code); PGD-AT: U(-eps, eps) (Madry et al.)."""
    from ml.attacks import TRAINING_START, training_attack

    assert TRAINING_START[method] == start
    x = torch.full((64, 1, 8, 8), 0.5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    attack = training_attack(method, eps=0.1, step_size=0.02, steps=0)  # no step: the start itself
    delta = attack(model, x, torch.zeros(64, dtype=torch.int64), torch.Generator().manual_seed(0)) - x
    if start == "normal":
        assert 0.0005 < delta.std() < 0.002
    else:
        assert delta.abs().max() > 0.099 and abs(delta.std() - 0.1 / 3 ** 0.5) < 0.005


def test_recipe_targets_attack_the_labels_and_a_cutmix_mixture(trained):
    """Smoothing and weights shape the training loss only: the attack on Targets without CutMix is the
    attack on the labels; with CutMix it ascends the cross-entropy of the two labels' area mixture."""
    from ml.losses import Targets

    model, x, y = trained
    kw = dict(eps=0.1, step_size=0.02, steps=3, random_start="normal")
    plain = pgd_linf(model, x, y, generator=torch.Generator().manual_seed(2), **kw)
    targets = Targets(y, smoothing=torch.full((len(y),), 0.3), weights=torch.full((len(y),), 0.5))
    assert torch.equal(pgd_linf(model, x, targets, generator=torch.Generator().manual_seed(2), **kw), plain)
    # A box of the other class covering all the image: the mixture is the other label, so the attack
    # pushes towards y (the image's own label) instead of away from it.
    flipped = Targets(y, mixed_labels=1 - y, mixed_share=torch.ones(len(y)))
    towards = pgd_linf(model, x, flipped, generator=torch.Generator().manual_seed(2), **kw)

    def margin(images):  # mean logit of the label over the other class
        with torch.no_grad():
            logits = model(images)
        return (logits.gather(1, y[:, None]) - logits.gather(1, 1 - y[:, None])).mean().item()

    assert margin(towards) > margin(x) > margin(plain)
