"""Reading the diffusion stage's `model/` directory (diffusers layout, safetensors only) for sampling.

A stand-in for ml.diffusion.load_generator, which the diffusion stage's branch brings with the same
return shape (unet, scheduler config, info with num_classes / class_names / image_size / in_channels);
once both are merged this module goes and the generate stage imports that one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.bounded import read_regular
from pipeline.core.errors import UserError

INFO_FILE = "rst_mart.json"


@dataclass(frozen=True)
class GeneratorInfo:
    num_classes: int  # 0 = unconditional
    class_names: tuple[str, ...]
    image_size: int
    in_channels: int


def load_generator(directory: str | Path):
    """(UNet2DModel in eval mode, the training schedule's config dict, GeneratorInfo)."""
    from diffusers import UNet2DModel

    directory = Path(directory)
    unet_dir = directory / "unet"
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        raise UserError(f"{unet_dir} holds no diffusion_pytorch_model.safetensors; the diffusion stage's entry is "
                        f"incomplete: rerun it with --stages diffusion --force.")
    unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False).eval()
    scheduler_config = _read_json(directory / "scheduler" / "scheduler_config.json")
    stored = _read_json(directory / INFO_FILE) if (directory / INFO_FILE).is_file() else {}
    size = unet.config.sample_size
    info = GeneratorInfo(num_classes=int(unet.config.num_class_embeds or 0),
                         class_names=tuple(stored.get("class_names", ())),
                         image_size=size if isinstance(size, int) else int(size[0]),
                         in_channels=int(unet.config.in_channels))
    return unet, {k: v for k, v in scheduler_config.items() if not k.startswith("_")}, info


def _read_json(path: Path) -> dict:
    try:
        return json.loads(read_regular(path, 1 << 20))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable JSON file ({e}); rerun the diffusion stage with --force.") from None
