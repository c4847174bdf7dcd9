"""Training objectives of adversarial training, as pure functions of logits.

Every loss has the signature (logits_natural, logits_adv, targets, beta) -> scalar mean over the
batch, so the training loop picks one by name from LOSSES and never branches on the method. The
attack that produced logits_adv runs elsewhere (ml.attacks); ATTACK_LOSS says which objective
each method's training attack ascends.

`targets` is a tensor of labels (the papers' losses, computed as their official code computes them) or
a Targets (the recipe options: label smoothing, CutMix label mixtures, per-example weights), for which
each loss is written per example:
- cross-entropy terms use the smoothed target (1 - s) w + s / K, w the example's label weights
  (one-hot, or CutMix's area mixture of two labels); this is PyTorch's and DM-AT's label smoothing;
- MART's margin term -log(1 - max_{j != k} p_j(x')) and misclassification weight 1 - p_k(x) are
  averaged over the labels k by the unsmoothed w: smoothing is a regulariser of the CE target, not a
  change of which class is the true one, while a CutMix example holds two true classes in proportion
  to their areas (CutMix's own loss is that mixture: lam * L(y_a) + (1 - lam) * L(y_b));
- KL terms compare two model distributions and take no label, so neither option touches them;
- the batch loss is sum_i weight_i * loss_i / B: weight 1 everywhere is the unweighted mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Targets:
    """A batch's targets beyond its hard labels, as the [mart] recipe options make them."""

    labels: Tensor  # (B,) int64: each example's label (CutMix: the label of the image the box was pasted into)
    smoothing: Tensor | None = None  # (B,) label smoothing of each example's CE target; None = none
    weights: Tensor | None = None  # (B,) weight of each example's loss in the batch mean; None = 1
    mixed_labels: Tensor | None = None  # (B,) CutMix: the label of the image the box came from
    mixed_share: Tensor | None = None  # (B,) CutMix: the box's share of the image's area; 0 = not mixed

    def label_weights(self, num_classes: int, dtype: torch.dtype) -> Tensor:
        """(B, K): one-hot labels, or for CutMix the area-weighted mixture of the two labels."""
        w = F.one_hot(self.labels, num_classes).to(dtype)
        if self.mixed_labels is not None:
            share = self.mixed_share.to(dtype)[:, None]
            w = (1 - share) * w + share * F.one_hot(self.mixed_labels, num_classes).to(dtype)
        return w

    def ce_targets(self, label_weights: Tensor) -> Tensor:
        """The CE term's target distribution: the label weights smoothed towards uniform."""
        if self.smoothing is None:
            return label_weights
        s = self.smoothing.to(label_weights.dtype)[:, None]
        return (1 - s) * label_weights + s / label_weights.shape[1]

    def batch_mean(self, per_example: Tensor) -> Tensor:
        if self.weights is not None:
            per_example = per_example * self.weights.to(per_example.dtype)
        return per_example.sum() / len(per_example)


@dataclass(frozen=True)
class TargetRecipe:
    """The [mart] options that turn a batch's labels into Targets: label smoothing of labeled and pool
    examples, and the pool examples' loss weight (RST's weight w of the pseudo-labeled loss)."""

    label_smoothing: float = 0.0  # of the labeled examples' CE targets
    pool_label_smoothing: float = 0.0  # of the pool (pseudo-labeled) examples' CE targets
    pool_loss_weight: float = 1.0  # of each pool example's loss, the labeled ones' being 1

    @property
    def plain(self) -> bool:
        """True when the options change nothing: the losses then run the papers' code on hard labels."""
        return self.label_smoothing == 0 and self.pool_label_smoothing == 0 and self.pool_loss_weight == 1

    def __call__(self, labels: Tensor, from_pool: Tensor | None, *, mixed_labels: Tensor | None = None,
                 mixed_share: Tensor | None = None) -> Targets:
        """Targets of a batch; `from_pool` marks its pool rows (None: no pool rows)."""
        from_pool = torch.zeros_like(labels, dtype=torch.bool) if from_pool is None else from_pool
        smoothing = weights = None
        if self.label_smoothing or self.pool_label_smoothing:
            smoothing = torch.where(from_pool, self.pool_label_smoothing, self.label_smoothing)
        if self.pool_loss_weight != 1:
            weights = torch.where(from_pool, self.pool_loss_weight, 1.0)
        return Targets(labels, smoothing=smoothing, weights=weights, mixed_labels=mixed_labels,
                       mixed_share=mixed_share)


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per example: -sum_k target_k log softmax(logits)_k."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)


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
    if isinstance(targets, Targets):
        return _mart_loss_per_example(logits_natural, logits_adv, targets, beta)
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


def _mart_loss_per_example(logits_natural: Tensor, logits_adv: Tensor, targets: Targets, beta: float) -> Tensor:
    """mart_loss with Targets (see the module docstring); equal to it, up to rounding, for plain labels."""
    num_classes = logits_adv.shape[1]
    w = targets.label_weights(num_classes, logits_adv.dtype)
    adv_probs = F.softmax(logits_adv, dim=1)
    ce = _soft_cross_entropy(logits_adv, targets.ce_targets(w))
    # The margin term under each label k: the most probable class other than k is the top class, or the
    # runner-up where the top class is k.
    top2 = adv_probs.topk(2, dim=1)
    top_is_k = F.one_hot(top2.indices[:, 0], num_classes).bool()
    best_other = torch.where(top_is_k, top2.values[:, 1:2], top2.values[:, 0:1])
    margin = -(w * torch.log(1.0001 - best_other + 1e-12)).sum(dim=1)
    nat_probs = F.softmax(logits_natural, dim=1)
    true_probs = (w * nat_probs).sum(dim=1)
    kl_per_example = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    return targets.batch_mean(ce + margin + float(beta) * kl_per_example * (1.0000001 - true_probs))


def trades_loss(logits_natural: torch.Tensor, logits_adv: torch.Tensor, targets: torch.Tensor,
                beta: float = 6.0) -> torch.Tensor:
    """TRADES (Zhang et al., ICML 2019) as in its official code: natural CE
    + beta * KL(p_natural || p_adv) summed over the batch and divided by the batch size."""
    logits_natural, logits_adv = _at_least_fp32(logits_natural), _at_least_fp32(logits_adv)
    if isinstance(targets, Targets):
        w = targets.label_weights(logits_natural.shape[1], logits_natural.dtype)
        kl_per_example = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_natural, dim=1),
                                  reduction="none").sum(dim=1)
        return targets.batch_mean(_soft_cross_entropy(logits_natural, targets.ce_targets(w))
                                  + float(beta) * kl_per_example)
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
    logits_adv = _at_least_fp32(logits_adv)
    if isinstance(targets, Targets):
        w = targets.label_weights(logits_adv.shape[1], logits_adv.dtype)
        return targets.batch_mean(_soft_cross_entropy(logits_adv, targets.ce_targets(w)))
    return F.cross_entropy(logits_adv, targets)


# Method name ([mart] loss in the config) -> training objective.
LOSSES = {"mart": mart_loss, "trades": trades_loss, "pgd-at": pgd_at_loss}

# Method name -> the objective its training attack ascends (ml.attacks.pgd_linf `loss`):
# MART and Madry attack cross-entropy; TRADES attacks its own KL term.
ATTACK_LOSS = {"mart": "ce", "trades": "kl", "pgd-at": "ce"}
