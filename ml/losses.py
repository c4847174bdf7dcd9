"""Training objectives of adversarial training, as pure functions of logits.

Every loss has the signature (logits_natural, logits_adv, targets, beta) -> scalar mean over the
batch, so the training loop picks one by name from LOSSES and never branches on the method. The
attack that produced logits_adv runs elsewhere (ml.attacks); ATTACK_LOSS says which objective
each method's training attack ascends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 logits (autocast) are upcast: 1.0001 and 1e-12 vanish in half-precision
    arithmetic. fp64 stays fp64 so gradient checks in double precision stay exact."""
    return t if t.dtype == torch.float64 else t.float()


def mart_loss(logits_natural: torch.Tensor, logits_adv: torch.Tensor, targets: torch.Tensor,
              beta: float = 6.0) -> torch.Tensor:
    """MART (Wang et al., ICLR 2020), term for term the official code (YisenWang/MART).

    Boosted CE on the adversarial example (CE plus -log(1 - p_adv) of the strongest wrong class)
    + beta * KL(p_natural || p_adv) weighted per example by 1 - p_natural(y), the
    misclassification weight, which is deliberately NOT detached: the official code lets its
    gradient reach the natural logits, and that is the method the paper's numbers come from.
    The constants 1.0001, 1e-12 and 1.0000001 are the official ones.
    """
    logits_natural, logits_adv = _at_least_fp32(logits_natural), _at_least_fp32(logits_adv)
    batch_size = logits_adv.shape[0]

    adv_probs = F.softmax(logits_adv, dim=1)
    # The most probable wrong class: the top class, or the runner-up when the top one is the label.
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == targets, top2[:, -2], top2[:, -1])
    loss_adv = (F.cross_entropy(logits_adv, targets)
                + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y))

    nat_probs = F.softmax(logits_natural, dim=1)
    # squeeze(1), not squeeze(): a batch of one must stay a vector.
    true_probs = torch.gather(nat_probs, 1, targets[:, None].long()).squeeze(1)
    # kl_div(log q, p) = sum p (log p - log q) = KL(p_natural || p_adv), per class here.
    kl_per_example = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    loss_robust = (1.0 / batch_size) * torch.sum(kl_per_example * (1.0000001 - true_probs))
    return loss_adv + float(beta) * loss_robust


def trades_loss(logits_natural: torch.Tensor, logits_adv: torch.Tensor, targets: torch.Tensor,
                beta: float = 6.0) -> torch.Tensor:
    """TRADES (Zhang et al., ICML 2019) as in its official code: natural CE
    + beta * KL(p_natural || p_adv) summed over the batch and divided by the batch size."""
    logits_natural, logits_adv = _at_least_fp32(logits_natural), _at_least_fp32(logits_adv)
    batch_size = logits_adv.shape[0]
    loss_natural = F.cross_entropy(logits_natural, targets)
    loss_robust = (1.0 / batch_size) * F.kl_div(
        F.log_softmax(logits_adv, dim=1), F.softmax(logits_natural, dim=1), reduction="sum")
    return loss_natural + float(beta) * loss_robust


def pgd_at_loss(logits_natural: torch.Tensor, logits_adv: torch.Tensor, targets: torch.Tensor,
                beta: float = 0.0) -> torch.Tensor:
    """Madry et al. adversarial training: CE on the adversarial logits only. logits_natural and
    beta are accepted (and ignored) so every loss shares one signature."""
    del logits_natural, beta
    return F.cross_entropy(_at_least_fp32(logits_adv), targets)


# Method name ([mart] loss in the config) -> training objective.
LOSSES = {"mart": mart_loss, "trades": trades_loss, "pgd-at": pgd_at_loss}

# Method name -> the objective its training attack ascends (ml.attacks.pgd_linf `loss`):
# MART and Madry attack cross-entropy; TRADES attacks its own KL term.
ATTACK_LOSS = {"mart": "ce", "trades": "kl", "pgd-at": "ce"}
