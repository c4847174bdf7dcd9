"""What updates the weights: SGD, the per-step learning-rate schedule, and the weight EMA."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def make_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(optimizer, *, schedule: str, epochs: int, steps_per_epoch: int, milestones=()):
    """Per-step LambdaLR: cosine to zero, piecewise x0.1 at each milestone epoch, or constant."""
    total = max(1, epochs * steps_per_epoch)
    bounds = sorted(int(m) * steps_per_epoch for m in milestones)

    def factor(step: int) -> float:
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        if schedule == "piecewise":
            return 0.1 ** sum(step >= b for b in bounds)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class WeightEMA:
    """Exponential moving average of the parameters, with warm-up: decay_t = min(decay, (1+t)/(10+t)).

    Buffers (BatchNorm statistics) are copied from the live model rather than averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = list(self.model.parameters())
        live_params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, live_params, 1.0 - decay)
        for ema_b, live_b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(live_b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
