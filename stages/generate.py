"""Stage generate: sample `generate.n` images from the diffusion stage's model into HDF5 pool shards.

Image i depends only on (run.seed, i): its noise comes from a generator seeded by (seed, i), its class is
i % K (balanced) or drawn from (seed, i), and a batch never crosses a shard (the last shard's last batch is
made full-size and cut, as a larger pool's batch). So any process can make any shard, a pool of 2n images
starts with the n images of a pool of n, and a run killed mid-way resumes at the first missing shard with
the uninterrupted result. Under torchrun each rank makes its own shards; a launcher may run them as
separate jobs (`StageContext.shard`) and commit the stage once, when every shard exists. Memory holds one
batch at a time: flat in n.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from data.pool_shards import MAX_SHARDS, shard_count, shard_name
from pipeline.core.checks import at_least
from pipeline.stage import RUNTIME, Stage

SAMPLERS = ("dpm-solver++", "ddim", "heun")  # ml.sampling.SAMPLERS (not imported: `status` stays free of torch)
MAX_STEPS = 1000  # a sampler step per training timestep at most (DDPM's schedule has 1,000)


@dataclass
class GenerateConfig:
    n: int = 50_000  # images in the pool
    sampler: str = "dpm-solver++"  # dpm-solver++ | ddim | heun (EDM's, Karras sigmas: 2 * steps - 1 UNet calls)
    steps: int = 20  # sampler steps per image (DPM-Solver++: 10-20 suffice)
    balanced: bool = True  # class of image i = i % K (every prefix balanced); false: random classes, or unconditional
    shard_size: int = 10_000  # images per HDF5 shard file: the unit of resume and of fan-out over jobs
    batch_size: int = 256  # images per UNet forward (speed only)

    RANGES: ClassVar[dict] = {
        "n": at_least(1, "images in the generated pool", high=2**40),
        "sampler": SAMPLERS,
        "steps": at_least(1, "sampler steps per image; 10-20 suffice for DPM-Solver++", high=MAX_STEPS),
        "shard_size": at_least(1, "images per shard file", high=2**24),
        "batch_size": at_least(1, "images per UNet forward", high=2**16),
    }

    def check(self, config, refuse, world_size: int) -> None:
        shards = shard_count(self.n, self.shard_size)
        if shards > MAX_SHARDS:
            raise refuse("generate.shard_size", f"it makes {shards:,} shard files of generate.n = {self.n:,} images, "
                         f"over the {MAX_SHARDS:,} a pool may have",
                         f"Set generate.shard_size to at least {shard_count(self.n, MAX_SHARDS):,} (with --set "
                         f"generate.shard_size=...); a shard of 10,000 to 100,000 images suits most pools.")


def _outputs(config) -> tuple[str, ...]:
    cfg = config.generate
    return tuple(shard_name(s) for s in range(shard_count(cfg.n, cfg.shard_size)))


def _shards(config) -> int:
    return shard_count(config.generate.n, config.generate.shard_size)


def run(ctx) -> None:
    """The missing shards of this call (ctx.shard: the runner gives each torchrun rank or launcher job its
    own), then, on the call without ctx.shard, any shard still missing and the cleanup of what killed writers
    left. No collectives: the finishing call runs on one process."""
    cfg = ctx.config.generate
    total = _shards(ctx.config)
    mine = [s for s in range(total) if ctx.shard is None or s % ctx.shard[1] == ctx.shard[0]]
    missing = [s for s in mine if not (ctx.out_dir / shard_name(s)).exists()]
    if missing:
        _make_shards(ctx, missing)
    if ctx.shard is not None:
        return
    from data.pool_shards import remove_leftovers

    remove_leftovers(ctx.out_dir)
    ctx.log(f"  {cfg.n:,} images in {total} shards of up to {cfg.shard_size:,}")


def _make_shards(ctx, shards: list[int]) -> None:
    import torch
    from tqdm import tqdm

    from data.pool_shards import shard_rows, write_shard
    from ml.devices import resolve_device
    from ml.diffusion import load_generator
    from ml.sampling import (
        build_sampler,
        check_precision,
        denoise,
        image_classes,
        initial_noise,
        prepare_for_sampling,
        to_uint8,
    )
    from pipeline.core.errors import UserError

    cfg, run_cfg = ctx.config.generate, ctx.config.run
    unet, scheduler_config, info = load_generator(ctx.inputs["diffusion"].path / "model")
    conditional = info.num_classes > 0
    if cfg.balanced and not conditional:
        raise UserError("`generate.balanced` is true but the diffusion model is unconditional (its UNet has no "
                        "class embeddings), so it cannot make images of chosen classes. Set generate.balanced = "
                        "false (the teacher's pseudo-labels then label its images, as Rebuffi et al. did), or "
                        "use a class-conditional model (diffusion.checkpoint, or leave it empty to train one).")
    train_steps = int(scheduler_config.get("num_train_timesteps", 1000))
    if cfg.steps > train_steps:
        raise UserError(f"`generate.steps` is {cfg.steps}, more than the {train_steps} timesteps the diffusion "
                        f"model was trained with. Set generate.steps to at most {train_steps} (10-20 suffice).")
    device = resolve_device(run_cfg.device, ctx.dist.local_rank)
    check_precision(run_cfg.precision, device)
    model, memory_format = prepare_for_sampling(unet, device, channels_last=run_cfg.channels_last,
                                                compile=run_cfg.compile)
    scheduler = build_sampler(scheduler_config, cfg.sampler, cfg.steps)
    shape = (info.in_channels, info.image_size, info.image_size)
    attrs = {"num_classes": info.num_classes, "class_names": list(info.class_names), "seed": run_cfg.seed,
             "sampler": cfg.sampler, "steps": cfg.steps, "balanced": cfg.balanced,
             "generate_fingerprint": ctx.fingerprint}
    sizes = [shard_rows(s, cfg.n, cfg.shard_size) for s in shards]
    bar = tqdm(total=sum(b - a for a, b in sizes), desc="generate", unit="img", disable=not ctx.dist.is_main)
    for shard, (start, stop) in zip(shards, sizes):
        full_stop = start + cfg.shard_size  # where this shard ends in a pool large enough to fill it
        with write_shard(ctx.out_dir / shard_name(shard), stop - start, shape[1:] + shape[:1],
                         with_labels=conditional, attrs={**attrs, "first_index": start}) as writer:
            # Full-size batches, as in a larger pool (the last one is cut when written).
            batches = [(first, min(first + cfg.batch_size, full_stop)) for first in range(start, stop, cfg.batch_size)]
            noise = initial_noise(run_cfg.seed, *batches[0], shape)
            for b, (first, last) in enumerate(batches):
                classes = (image_classes(run_cfg.seed, first, last, info.num_classes, cfg.balanced) if conditional
                           else None)
                x = denoise(model, scheduler, noise.to(device), torch.from_numpy(classes).to(device) if conditional
                            else None, steps=cfg.steps, precision=run_cfg.precision, memory_format=memory_format)
                if b + 1 < len(batches):  # on a GPU the batch above is still running: draw the next noise meanwhile
                    noise = initial_noise(run_cfg.seed, *batches[b + 1], shape)
                keep = min(last, stop) - first
                writer.write(first - start, to_uint8(x[:keep]), classes[:keep] if conditional else None)
                bar.update(keep)
    bar.close()


STAGE = Stage(
    name="generate", version=1, section="generate", config=GenerateConfig, run=run, outputs=_outputs, shards=_shards,
    inputs=lambda config: ("diffusion",),
    reads=("run.seed", "run.precision", *RUNTIME),
    # batch_size changes only how many images share a forward (as pseudolabel's), not which images are made.
    insignificant=("batch_size", *RUNTIME))
