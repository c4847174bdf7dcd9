"""L-inf attacks in pixel space: PGD (CE / TRADES-KL / CW-margin objectives), FGSM, and the
input-gradient norms the evaluation uses to spot gradient masking; and the two attacks the stages
share: each method's training attack and the PGD-20 evaluation attack.

Pure and model-agnostic: the caller chooses train/eval mode and the device, inputs are images in
[0, 1], and every function returns a detached tensor in [0, 1] within eps of `x` (L-inf).
Gradients are taken w.r.t. the input only with torch.autograd.grad, so parameter .grad is never
touched and an attack can run between a training step's zero_grad and backward.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ml.losses import ATTACK_LOSS, Targets

ATTACK_LOSSES = ("ce", "kl", "cw")
RANDOM_STARTS = ("uniform", "normal", None)
EVAL_STEPS = 20  # PGD-20, the papers' headline white-box attack


def _attack_objective(logits: torch.Tensor, y: torch.Tensor | Targets, loss: str,
                      natural_probs: torch.Tensor | None) -> torch.Tensor:
    """The scalar each step ascends; summed over the batch so its per-example gradient does not
    shrink with batch size (sign() ignores the scale, but the masking checks read magnitudes)."""
    # fp32 even under autocast: a bf16 softmax loses the small differences the sign() follows.
    logits = logits.float()
    if isinstance(y, Targets):
        # Recipe targets: label smoothing and loss weights shape the training loss, not the attack; a
        # CutMix example's cross-entropy is that of its two labels' area mixture.
        y = y.labels if y.mixed_labels is None or loss != "ce" else y.label_weights(logits.shape[1], logits.dtype)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    if loss == "kl":
        # TRADES: KL(p_natural || p_adv), the KLDivLoss(sum) of the official code.
        return F.kl_div(F.log_softmax(logits, dim=1), natural_probs, reduction="sum")
    # CW margin: best wrong logit minus the true one, ascended until the example is misclassified.
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return (wrong.amax(dim=1) - true_logit).sum()


class ExampleSeeds:
    """Random starts drawn per example: row i's noise comes from a generator seeded by seeds[i], so an
    example's start depends on its seed (e.g. its index in the evaluated set), never on the batch it falls
    in. Pass it as an attack's `generator`."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.seeds = list(seeds)
        self.generator = torch.Generator(device=device)  # re-seeded per row

    def draw(self, fn, x: torch.Tensor) -> torch.Tensor:
        if len(self.seeds) != len(x):
            raise ValueError(f"{len(self.seeds)} seeds for a batch of {len(x)}")
        out = torch.empty_like(x)
        for i, seed in enumerate(self.seeds):
            out[i] = fn(x.shape[1:], generator=self.generator.manual_seed(seed), device=x.device, dtype=x.dtype)
        return out


def _noise(fn, x: torch.Tensor, generator) -> torch.Tensor:
    """torch.rand / torch.randn shaped like x, from one generator or per example (ExampleSeeds)."""
    if isinstance(generator, ExampleSeeds):
        return generator.draw(fn, x)
    return fn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
             steps: int, loss: str = "ce", random_start: str | None = "uniform",
             init_std: float = 0.001, logits_natural: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected sign-gradient ascent on `loss` ("ce", "kl" or "cw") inside the eps L-inf ball.

    random_start: "uniform" adds U(-eps, eps), projected (Madry et al., evaluation); "normal" adds
    init_std * N(0, 1), not projected before the first step (the MART/TRADES training attack, as their
    official code); None starts at x. `generator` (on x's device; or ExampleSeeds, one stream per example)
    makes the start reproducible. For "kl", `logits_natural` are the clean logits the divergence is
    measured from; they are computed here without gradient when not given.
    """
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; expected one of {ATTACK_LOSSES}")
    if random_start not in RANDOM_STARTS:
        raise ValueError(f"unknown random_start {random_start!r}; expected one of {RANDOM_STARTS}")
    x = x.detach()
    natural_probs = None
    if loss == "kl":
        if logits_natural is None:
            with torch.no_grad():
                logits_natural = model(x)
        # The target distribution is a constant of the attack.
        natural_probs = F.softmax(logits_natural.detach().float(), dim=1)

    if random_start == "uniform":
        # Madry et al. clip the uniform start into the image range before the first gradient.
        x_adv = _project(x + (2.0 * _noise(torch.rand, x, generator) - 1.0) * eps, x, eps)
    elif random_start == "normal":
        # MART's and TRADES' official code take the first gradient at x + 0.001 N(0, 1) as drawn, outside
        # [0, 1] where x is 0 or 1 (a third of Fashion-MNIST's pixels), and clamp only after each step.
        x_adv = x + init_std * _noise(torch.randn, x, generator)
    else:
        x_adv = x.clone()

    for _ in range(steps):
        x_adv.requires_grad_(True)
        # enable_grad: the evaluation loop may call this inside torch.no_grad().
        with torch.enable_grad():
            objective = _attack_objective(model(x_adv), y, loss, natural_probs)
            (grad,) = torch.autograd.grad(objective, x_adv)
        x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, eps)
    # Every step ends projected; a normal start with no step is projected here, as the official code's
    # final clamp does.
    return _project(x_adv, x, eps).detach() if steps == 0 else x_adv.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float) -> torch.Tensor:
    """One full-eps signed-gradient step on cross-entropy from x (Goodfellow et al.)."""
    return pgd_linf(model, x, y, eps=eps, step_size=eps, steps=1, loss="ce", random_start=None)


def cw_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
            steps: int = 30, generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD on the CW margin from a uniform random start (the "CW-inf" row of the MART paper)."""
    return pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=steps, loss="cw",
                    random_start="uniform", generator=generator)


def input_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example L1 norm of d CE / d x, shape [B]; near-zero values flag gradient masking."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        objective = _attack_objective(model(x), y, "ce", None)
        (grad,) = torch.autograd.grad(objective, x)
    return grad.flatten(1).abs().sum(dim=1).detach()


def eval_attack(eps: float, steps: int = EVAL_STEPS) -> Callable:
    """PGD with a uniform random start and Madry's step rule (2.5 eps / steps): the stages' robust accuracy."""
    return lambda model, x, y, generator: pgd_linf(
        model, x, y, eps=eps, step_size=2.5 * eps / steps, steps=steps, loss="ce", random_start="uniform",
        generator=generator)


# Method -> the random start of its training attack: MART and TRADES start at x + 0.001 N(0, 1) as their
# official code does; Madry et al.'s PGD-AT starts uniformly in the eps-ball.
TRAINING_START = {"mart": "normal", "trades": "normal", "pgd-at": "uniform"}


def training_attack(method: str, *, eps: float, step_size: float, steps: int) -> Callable:
    """`attack(model, x, y, generator) -> x_adv` of a training method ([mart] loss): PGD on the method's
    objective (ml.losses.ATTACK_LOSS) from the method's start (TRAINING_START)."""
    def attack(model, x, y, generator):
        return pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=steps, loss=ATTACK_LOSS[method],
                        random_start=TRAINING_START[method], init_std=0.001, generator=generator)
    return attack
