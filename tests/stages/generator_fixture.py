"""A tiny real diffusers generator in the diffusion stage's layout, and the generate stage run on it directly."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from pipeline.config import Config
from pipeline.core.distributed import dist_info
from pipeline.stage import StageContext, StageInput

TINY_SHAPE = (28, 28, 1)


def save_tiny_generator(entry: Path, *, num_classes: int = 10, seed: int = 0) -> Path:
    """`entry/model/` as the diffusion stage writes it: unet/ (safetensors), scheduler/, rst_mart.json."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    model = Path(entry) / "model"
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, layers_per_block=1,
                       num_class_embeds=num_classes or None, norm_num_groups=4)
    unet.save_pretrained(model / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(model / "scheduler")
    (model / "rst_mart.json").write_text(json.dumps({
        "num_classes": num_classes, "class_names": [f"c{k}" for k in range(num_classes)], "image_size": 28,
        "in_channels": 1, "dataset": "fashion-mnist"}))
    return Path(entry)


def generate_config(**settings) -> Config:
    config = Config()
    for key, value in {"steps": 4, "shard_size": 16, "batch_size": 8, **settings}.items():
        setattr(config.generate, key, value)
    return config


def run_generate(generator: Path, out_dir: Path, config: Config, shard=None) -> None:
    from stages.generate import STAGE

    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(config=STAGE.view(config), out_dir=out_dir, sources={},
                       inputs={"diffusion": StageInput(generator, "f" * 64)}, fingerprint="0" * 64, dist=dist_info(),
                       log=lambda message: None, shard=shard)
    STAGE.run(ctx)


def read_pool(directory: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Every shard's images and labels end to end (labels None when the shards have none)."""
    images, labels = [], []
    for path in sorted(Path(directory).glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            images.append(f["images"][()])
            labels.append(f["labels"][()] if "labels" in f else None)
    return np.concatenate(images), (None if labels[0] is None else np.concatenate(labels))
