"""MART / TRADES / PGD-AT losses against values worked out with plain `math`, not torch ops."""
import math

import pytest
import torch
import torch.nn.functional as F

from ml.losses import ATTACK_LOSS, LOSSES, mart_loss, pgd_at_loss, trades_loss

# Example 0: the adversarial top class (0) is the label, so MART boosts the runner-up (class 1).
# Example 1: the adversarial top class (1) is wrong, so MART boosts it (label 2).
LOGITS_NAT = [[1.0, 0.5, -0.5], [0.2, 0.1, 0.3]]
LOGITS_ADV = [[2.0, 1.0, 0.0], [0.5, 1.5, -1.0]]
TARGETS = [0, 2]


def softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def mart_by_hand(nat, adv, y, beta, boosted=None):
    ce = boost = robust = 0.0
    for i, (zn, za, t) in enumerate(zip(nat, adv, y)):
        pa, pn = softmax(za), softmax(zn)
        order = sorted(range(len(za)), key=lambda k: pa[k])
        new_y = order[-2] if order[-1] == t else order[-1]
        if boosted is not None:
            new_y = boosted[i]
        ce += -math.log(pa[t])
        boost += -math.log(1.0001 - pa[new_y] + 1e-12)
        kl = sum(p * (math.log(p) - math.log(q + 1e-12)) for p, q in zip(pn, pa))
        robust += kl * (1.0000001 - pn[t])
    n = len(y)
    return ce / n + boost / n + beta * robust / n


def trades_by_hand(nat, adv, y, beta):
    ce = robust = 0.0
    for zn, za, t in zip(nat, adv, y):
        pa, pn = softmax(za), softmax(zn)
        ce += -math.log(pn[t])
        robust += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pn, pa))
    return ce / len(y) + beta * robust / len(y)


def tensors(nat=LOGITS_NAT, adv=LOGITS_ADV, y=TARGETS):
    return torch.tensor(nat), torch.tensor(adv), torch.tensor(y)


def test_mart_runner_up_is_boosted_when_top_class_is_the_label():
    nat, adv, y = tensors(LOGITS_NAT[:1], LOGITS_ADV[:1], TARGETS[:1])
    got = mart_loss(nat, adv, y, beta=6.0)
    assert got.shape == ()
    assert got.item() == pytest.approx(mart_by_hand(LOGITS_NAT[:1], LOGITS_ADV[:1], TARGETS[:1], 6.0), rel=1e-5)
    # The boost is on class 1, the runner-up: boosting the label (0) or class 2 gives other values.
    for wrong in (0, 2):
        assert got.item() != pytest.approx(
            mart_by_hand(LOGITS_NAT[:1], LOGITS_ADV[:1], TARGETS[:1], 6.0, boosted=[wrong]), rel=1e-3)


def test_mart_top_class_is_boosted_when_it_is_wrong():
    nat, adv, y = tensors(LOGITS_NAT[1:], LOGITS_ADV[1:], TARGETS[1:])
    got = mart_loss(nat, adv, y, beta=6.0).item()
    assert got == pytest.approx(mart_by_hand(LOGITS_NAT[1:], LOGITS_ADV[1:], TARGETS[1:], 6.0), rel=1e-5)
    assert got != pytest.approx(
        mart_by_hand(LOGITS_NAT[1:], LOGITS_ADV[1:], TARGETS[1:], 6.0, boosted=[0]), rel=1e-3)


def test_mart_batch_is_the_mean_of_examples():
    nat, adv, y = tensors()
    for beta in (0.0, 1.0, 6.0):
        assert mart_loss(nat, adv, y, beta=beta).item() == pytest.approx(
            mart_by_hand(LOGITS_NAT, LOGITS_ADV, TARGETS, beta), rel=1e-5)


def test_mart_beta_zero_is_boosted_ce():
    nat, adv, y = tensors()
    boosted_ce = 0.0
    for za, t, new_y in zip(LOGITS_ADV, TARGETS, [1, 1]):
        pa = softmax(za)
        boosted_ce += (-math.log(pa[t]) - math.log(1.0001 - pa[new_y] + 1e-12)) / 2
    assert mart_loss(nat, adv, y, beta=0.0).item() == pytest.approx(boosted_ce, rel=1e-5)
    # ...and then the natural logits play no part.
    assert mart_loss(nat * 10, adv, y, beta=0.0).item() == pytest.approx(boosted_ce, rel=1e-5)


def _mart_with_detached_weight(logits_nat, logits_adv, y, beta):
    """The tempting variant that stops the gradient through 1 - p_nat(y); MART must differ from it."""
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits_nat, dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1).detach()
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
    return loss_adv + beta * (kl * (1.0000001 - true_probs)).sum() / len(y)


def test_mart_gradient_flows_through_the_misclassification_weight():
    nat, adv, y = tensors()
    nat64, adv64 = nat.double().requires_grad_(), adv.double()
    (grad,) = torch.autograd.grad(mart_loss(nat64, adv64, y, beta=6.0), nat64)
    nat64b = nat.double().requires_grad_()
    (grad_detached,) = torch.autograd.grad(_mart_with_detached_weight(nat64b, adv64, y, 6.0), nat64b)
    assert grad.abs().sum() > 0
    assert not torch.allclose(grad, grad_detached, atol=1e-6)
    # Same value, only the gradient path differs.
    assert mart_loss(nat64, adv64, y).item() == pytest.approx(
        _mart_with_detached_weight(nat64, adv64, y, 6.0).item(), rel=1e-12)


def test_mart_gradient_matches_finite_differences():
    nat = torch.tensor(LOGITS_NAT, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor(LOGITS_ADV, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mart_loss(a, b, torch.tensor(TARGETS)), (nat, adv))


def test_trades_by_hand():
    nat, adv, y = tensors()
    for beta in (0.0, 6.0):
        assert trades_loss(nat, adv, y, beta=beta).item() == pytest.approx(
            trades_by_hand(LOGITS_NAT, LOGITS_ADV, TARGETS, beta), rel=1e-5)


def test_pgd_at_is_ce_on_adversarial_logits():
    nat, adv, y = tensors()
    want = sum(-math.log(softmax(za)[t]) for za, t in zip(LOGITS_ADV, TARGETS)) / 2
    assert pgd_at_loss(nat, adv, y).item() == pytest.approx(want, rel=1e-5)
    assert pgd_at_loss(None, adv, y, beta=6.0).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_takes_a_batch_of_one_and_half_precision(name):
    nat, adv, y = tensors(LOGITS_NAT[:1], LOGITS_ADV[:1], TARGETS[:1])
    loss = LOSSES[name](nat, adv, y, beta=6.0)
    assert loss.shape == () and torch.isfinite(loss)
    # bf16 logits (autocast) are computed in fp32 and give a close value.
    half = LOSSES[name](nat.bfloat16(), adv.bfloat16(), y, beta=6.0)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(loss.item(), rel=2e-2)


def test_registries_agree():
    assert set(LOSSES) == set(ATTACK_LOSS) == {"mart", "trades", "pgd-at"}
    assert ATTACK_LOSS == {"mart": "ce", "trades": "kl", "pgd-at": "ce"}


# -- the recipe options (ml.losses.Targets) ---------------------------------------------------------------
from ml.losses import TargetRecipe, Targets  # noqa: E402


def random_batch(n=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * 2,
            torch.randn(n, k, generator=g, dtype=torch.float64) * 2,
            torch.randint(0, k, (n,), generator=g))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_targets_without_options_give_the_papers_loss_and_gradients(name):
    nat, adv, y = random_batch()
    nat.requires_grad_(), adv.requires_grad_()
    plain = LOSSES[name](nat, adv, y, beta=6.0)
    general = LOSSES[name](nat, adv, Targets(y), beta=6.0)
    assert general.item() == pytest.approx(plain.item(), rel=1e-12)
    wrt = (adv,) if name == "pgd-at" else (nat, adv)
    for a, b in zip(torch.autograd.grad(plain, wrt), torch.autograd.grad(general, wrt)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def smoothed_ce_by_hand(z, t, s):
    p = softmax(z)
    return -sum(((1 - s) * (k == t) + s / len(z)) * math.log(p[k]) for k in range(len(z)))


def test_label_smoothing_enters_only_the_cross_entropy_terms():
    """MART: the CE target is smoothed, the margin term and the misclassification weight keep the label;
    TRADES: its natural CE is smoothed, its KL is not; PGD-AT equals PyTorch's label_smoothing."""
    nat, adv, y = tensors()
    s = 0.1
    targets = Targets(y, smoothing=torch.full((2,), s))
    want = mart_by_hand(LOGITS_NAT, LOGITS_ADV, TARGETS, 6.0)
    for za, t in zip(LOGITS_ADV, TARGETS):
        want += (smoothed_ce_by_hand(za, t, s) + math.log(softmax(za)[t])) / 2
    assert mart_loss(nat, adv, targets, beta=6.0).item() == pytest.approx(want, rel=1e-5)
    want = trades_by_hand(LOGITS_NAT, LOGITS_ADV, TARGETS, 6.0)
    for zn, t in zip(LOGITS_NAT, TARGETS):
        want += (smoothed_ce_by_hand(zn, t, s) + math.log(softmax(zn)[t])) / 2
    assert trades_loss(nat, adv, targets, beta=6.0).item() == pytest.approx(want, rel=1e-5)
    assert pgd_at_loss(nat, adv, targets).item() == pytest.approx(
        F.cross_entropy(adv, y, label_smoothing=s).item(), rel=1e-6)


def test_smoothing_is_per_example():
    nat, adv, y = random_batch()
    smoothing = torch.tensor([0.0, 0.2, 0.0, 0.2, 0.0, 0.2], dtype=torch.float64)
    got = pgd_at_loss(nat, adv, Targets(y, smoothing=smoothing))
    per_example = [F.cross_entropy(adv[i:i + 1], y[i:i + 1], label_smoothing=float(smoothing[i])) for i in range(6)]
    assert got.item() == pytest.approx(sum(per_example).item() / 6, rel=1e-10)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_cutmix_example_costs_the_area_mixture_of_its_two_labels(name):
    """CutMix's reference loss, lam * L(y_a) + (1 - lam) * L(y_b), for every method."""
    nat, adv, y = random_batch()
    other = (y + 1 + torch.arange(6) % 3) % 5
    share = 0.3
    targets = Targets(y, mixed_labels=other, mixed_share=torch.full((6,), share, dtype=torch.float64))
    mixed = LOSSES[name](nat, adv, targets, beta=6.0)
    want = (1 - share) * LOSSES[name](nat, adv, y, beta=6.0) + share * LOSSES[name](nat, adv, other, beta=6.0)
    assert mixed.item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weights_scale_each_examples_share_of_the_batch_mean(name):
    nat, adv, y = random_batch()
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    got = LOSSES[name](nat, adv, Targets(y, weights=weights), beta=6.0)
    kept = [0, 2, 4]
    # The kept half's mean, halved: the batch mean divides by all 6 examples, as RST's objective does.
    assert got.item() == pytest.approx(LOSSES[name](nat[kept], adv[kept], y[kept], beta=6.0).item() / 2, rel=1e-10)
    doubled = LOSSES[name](nat, adv, Targets(y, weights=torch.full((6,), 2.0, dtype=torch.float64)), beta=6.0)
    assert doubled.item() == pytest.approx(2 * LOSSES[name](nat, adv, y, beta=6.0).item(), rel=1e-10)


def test_target_recipe_applies_each_option_to_its_source():
    y = torch.tensor([3, 1, 4, 1])
    from_pool = torch.tensor([False, True, False, True])
    assert TargetRecipe().plain and not TargetRecipe(pool_loss_weight=0.5).plain
    plain = TargetRecipe()(y, from_pool)
    assert plain.smoothing is None and plain.weights is None and torch.equal(plain.labels, y)
    t = TargetRecipe(label_smoothing=0.1, pool_label_smoothing=0.2, pool_loss_weight=0.5)(y, from_pool)
    assert t.smoothing.tolist() == pytest.approx([0.1, 0.2, 0.1, 0.2])
    assert t.weights.tolist() == [1.0, 0.5, 1.0, 0.5]
    no_pool = TargetRecipe(label_smoothing=0.1, pool_label_smoothing=0.2)(y, None)
    assert no_pool.smoothing.tolist() == pytest.approx([0.1] * 4)
