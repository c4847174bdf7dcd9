"""A stand-in `diffusion` stage for testing the generate stage through the CLI before the built-in one is
merged: it imports a generator directory (diffusion.checkpoint) as its entry's model/, as the built-in's
import path does. Installed (as a plugin with an entry point) only where no built-in diffusion stage exists."""
import os
from pathlib import Path

from pipeline import stage_registry
from tests.conftest import ROOT

STAND_IN = '''
"""diffusion (test stand-in): imports a generator directory as the entry's model/."""
import shutil
from dataclasses import dataclass

from pipeline.stage import Stage


@dataclass
class DiffusionConfig:
    checkpoint: str = ""  # a generator directory (unet/, scheduler/, rst_mart.json)


def run(ctx):
    if ctx.dist.is_main:  # under torchrun one copy; the runner's barrier follows
        shutil.copytree(ctx.config.diffusion.checkpoint, ctx.out_dir / "model")
        (ctx.out_dir / "imported.txt").write_text(ctx.config.diffusion.checkpoint)


STAGE = Stage(name="diffusion", version=1, section="diffusion", config=DiffusionConfig, run=run,
              outputs=("imported.txt",))
'''


def diffusion_env(site: Path) -> dict:
    """The environment for CLI runs: PYTHONPATH with the repository, and the stand-in where it is needed."""
    paths = [str(ROOT)]
    if "diffusion" not in stage_registry.stages():
        (site / "diffusion_stand_in").mkdir(parents=True)
        (site / "diffusion_stand_in" / "__init__.py").write_text(STAND_IN)
        info = site / "diffusion_stand_in-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: diffusion-stand-in\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[rst_mart.stages]\ndiffusion = diffusion_stand_in:STAGE\n")
        paths.insert(0, str(site))
    return {"PYTHONPATH": os.pathsep.join(paths)}
