"""Live curves: training scalars written while a run trains, to TensorBoard and/or Weights & Biases.

metrics.csv gets one row per epoch, at its end; a multi-day run needs curves between those rows. The
training loop hands `scalars(step, {tag: value})` to the writer `open_scalar_log` returns, every
`every_steps` optimizer steps and at every epoch end. TensorBoard event files go to
`<out_dir>/tensorboard/`, the W&B run (offline by default: no network, `wandb sync` uploads it later) to
`<out_dir>/wandb/`; both are extra files in the stage's store entry, not declared outputs. Both packages
are optional (`pip install 'rst-mart[log]'`); with both off nothing is imported and nothing written.

Under torchrun only rank 0 writes. A resumed run (the same partial directory, after a kill) opens a new
event file with `purge_step` = the step after the checkpoint it resumed from, so TensorBoard hides what
the killed run wrote past that checkpoint; W&B gets a new run of the same name whose steps continue.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.errors import missing_package_error

_logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


def _missing(settings: Any, option: str):
    # The pins are the [log] section's (PACKAGES on its dataclass), as pyproject's `log` extra has them.
    return missing_package_error(f"log.{option}", settings.PACKAGES[option], extra="log")


class ScalarLog:
    """Writes scalars to a TensorBoard SummaryWriter and/or a W&B run; `close()` finishes both."""

    def __init__(self, every_steps: int, tensorboard=None, wandb_run=None):
        self.every_steps = every_steps  # optimizer steps between the training loop's interval writes
        self._tensorboard = tensorboard
        self._wandb_run = wandb_run

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        values = {tag: float(value) for tag, value in values.items()}
        if self._tensorboard is not None:
            for tag, value in values.items():
                self._tensorboard.add_scalar(tag, value, global_step=step)
            # Flushed at every write, not SummaryWriter's default 120 s: the point is to watch the run,
            # and a kill must not lose the curve up to the last checkpoint.
            self._tensorboard.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            # finish() returns before W&B's service has written the run file (0.31 offline: measured at 7
            # of its 4,400 bytes); teardown waits for it, before the runner renames the partial directory.
            import wandb

            self._wandb_run.finish()
            wandb.teardown()
            self._wandb_run = None


def open_scalar_log(out_dir: Path, settings: Any, run_name: str, rank: int = 0, *,
                    params: Mapping[str, Any] | None = None, start_step: int | None = None) -> ScalarLog | None:
    """The writer for a training run into `out_dir`, or None when nothing is to be written (both options
    off, no settings, or a rank other than 0).

    `settings` has `tensorboard`, `wandb` (bools), `wandb_project`, `wandb_mode` (online | offline),
    `every_steps` and the pins `PACKAGES` (the engine's [log] section, pipeline.config.LogConfig). `params`
    become the W&B run's config. `start_step` is the optimizer step a resumed run continues from (None for
    a fresh run)."""
    if settings is None or rank != 0 or not (settings.tensorboard or settings.wandb):
        return None
    out_dir = Path(out_dir)
    tensorboard = wandb_run = None
    if settings.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing(settings, "tensorboard") from None
        # purge_step: TensorBoard hides what earlier event files hold past the checkpoint resumed from.
        tensorboard = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR),
                                    purge_step=None if start_step is None else start_step + 1)
    if settings.wandb:
        try:
            import wandb
        except ImportError:
            if tensorboard is not None:
                tensorboard.close()
            raise _missing(settings, "wandb") from None
        # console="off": W&B would otherwise wrap stdout/stderr, which the CLI and tqdm own.
        wandb_run = wandb.init(project=settings.wandb_project, dir=str(out_dir), mode=settings.wandb_mode,
                               name=run_name, config=dict(params or {}), settings=wandb.Settings(console="off"))
    _logger.info("live curves for %s: tensorboard=%s wandb=%s", run_name, settings.tensorboard, settings.wandb)
    return ScalarLog(settings.every_steps, tensorboard=tensorboard, wandb_run=wandb_run)
