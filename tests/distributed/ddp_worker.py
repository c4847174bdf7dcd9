"""Run under torchrun by test_torchrun.py (not collected by pytest): a few MART steps of a tiny-cnn
through ml.training.train_one_epoch with the real mixed-batch sampler and loader, then rank 0 writes
to the JSON file named on the command line whether the ranks ended with the same parameters and
gradients, and which labeled rows each rank trained on in each batch.

    python -m torch.distributed.run --nproc_per_node=2 --standalone -m tests.distributed.ddp_worker OUT.json
"""
from __future__ import annotations

import functools
import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from data.mixed import MixedBatchLoader, MixedBatchSampler
from ml import training
from ml.attacks import eval_attack, training_attack
from ml.devices import prepare_for_training
from ml.evaluation import evaluate
from ml.losses import LOSSES
from ml.models import build_model
from ml.optim import make_optimizer, make_scheduler
from pipeline.config import RunConfig
from pipeline.core import distributed

NUM_LABELED, NUM_POOL = 40, 30
# 3 global batches of 16 per epoch, 8 pool rows each: the test rebuilds the world_size=1 batches from these.
SAMPLER_ARGS = dict(batch_size=16, unsup_fraction=0.5, epoch_size=48, seed=0)
EPOCHS = 2


class RecordingSampler(MixedBatchSampler):
    """The real sampler, noting the labeled rows of every batch it hands to the loader."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labeled_batches: list[dict] = []

    def iter_batches(self):
        epoch, batches = self.epoch, super().iter_batches()  # called now: the resume point is taken here
        return (self._note(epoch, b, lab, pool) for b, lab, pool in batches)

    def _note(self, epoch, b, lab, pool):
        self.labeled_batches.append({"epoch": epoch, "batch": b, "labeled": lab.tolist()})
        return b, lab, pool


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def main(out_path: str) -> None:
    info = distributed.init_process_group("cpu")
    device = torch.device("cpu")
    rng = np.random.default_rng(0)  # the same data on every rank
    images = rng.integers(0, 256, (NUM_LABELED, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, NUM_LABELED)
    pool_images = rng.integers(0, 256, (NUM_POOL, 28, 28, 1), dtype=np.uint8)
    pool_labels = rng.integers(0, 10, NUM_POOL)

    torch.manual_seed(info.rank)  # different weights per rank on purpose: DDP must start all from rank 0's
    model = build_model("tiny-cnn", num_classes=10, in_channels=1)
    train_model, _ = prepare_for_training(model, run_cfg=RunConfig(device="cpu"), device=device,
                                                distributed=True)
    start = flat(model.parameters()).clone()
    sampler = RecordingSampler(NUM_LABELED, NUM_POOL, **SAMPLER_ARGS, rank=info.rank, world_size=info.world_size)
    loader = MixedBatchLoader(sampler, images, labels, pool_images, pool_labels, device=device, seed=0)
    optimizer = make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    t = training.Training(
        model=train_model, optimizer=optimizer, loader=loader,
        scheduler=make_scheduler(optimizer, schedule="constant", epochs=EPOCHS, steps_per_epoch=len(sampler)),
        recipe=training.Recipe(arch="tiny-cnn", epochs=EPOCHS, batch_size=SAMPLER_ARGS["batch_size"],
                               epoch_size=SAMPLER_ARGS["epoch_size"], lr=0.05, momentum=0.9, weight_decay=5e-4,
                               schedule="constant", loss=functools.partial(LOSSES["mart"], beta=6.0),
                               attack=training_attack("mart", eps=0.1, step_size=0.04, steps=3)),
        device=device, precision="fp32", seed=0,
        rank=info.rank, world_size=info.world_size)
    stats = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        stats.append(training.train_one_epoch(t, epoch, progress_bar=False))

    params, grads = gather(flat(model.parameters())), gather(flat(p.grad for p in model.parameters()))
    # Sharded evaluation (5 batches of 8 over 2 ranks, the last one short) against this rank alone.
    distributed.broadcast_buffers(model)
    scored = dict(device=device, batch_size=8, attack=eval_attack(0.1, steps=3), seed=0)
    sharded = evaluate(model, images[:37], labels[:37], rank=info.rank, world_size=info.world_size, **scored)
    whole = evaluate(model, images[:37], labels[:37], **scored)
    labeled = [None] * info.world_size
    dist.all_gather_object(labeled, sampler.labeled_batches)
    if info.is_main:
        with open(out_path, "w") as f:
            json.dump({
                "world_size": info.world_size,
                "params_identical": all(torch.equal(params[0], p) for p in params),
                "grads_identical": all(torch.equal(grads[0], g) for g in grads),
                "params_moved": not torch.equal(start, params[0]),
                "labeled": labeled,
                "eval_sharded": sharded, "eval_whole": whole,  # per rank: [{"epoch", "batch", "labeled": [rows]}]
                "stats": stats,
            }, f)
    # Both ranks done before either tears down its gloo pairs: rank 1 once aborted ("terminate called
    # without an active exception") tearing down while rank 0 was still writing the report under load.
    dist.barrier()
    distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
