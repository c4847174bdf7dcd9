"""Live curves through the CLI: `--set log.tensorboard=true --set log.wandb=true` on the smoke config
writes TensorBoard event files and offline W&B runs into the training stages' store entries, changes no
fingerprint, and leaves caching and `report` working."""
import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import SMOKE, run_cli
from tests.ml.test_live_log import _wandb_records

TAGS = {"train/loss", "train/acc", "train/lr", "train/images_per_s", "epoch/loss", "epoch/train_acc"}


def test_live_curves_in_the_store_entries_and_nothing_else_changes(tmp_path):
    workdir = tmp_path / "w"
    wandb_home = {name: str(tmp_path / "wandb-home") for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                                  "WANDB_DATA_DIR")}
    run_cli("run", "--config", SMOKE, "--workdir", workdir, "--set", "log.tensorboard=true",
            "--set", "log.wandb=true", "--set", "log.every_steps=2", env={**wandb_home, "WANDB_SILENT": "true"})
    for stage in ("teacher", "mart"):
        entry = (workdir / stage).resolve()
        assert entry.parent.parent == tmp_path / "store"  # the event files live in the store entry
        assert list((entry / "tensorboard").glob("events.out.tfevents.*"))
        events = EventAccumulator(str(entry / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert TAGS <= tags and (("train/attack_success" in tags) == (stage == "mart")), (stage, tags)
        steps = [e.step for e in events.Scalars("train/loss")]
        assert len(steps) >= 4 and steps == sorted(set(steps)) and all(s % 2 == 0 for s in steps)
        assert len(events.Scalars("epoch/loss")) == 2  # the smoke config's 2 epochs
        (run_file,) = (entry / "wandb").glob("offline-run-*/run-*.wandb")
        history = [r.history for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
        keys = {item.key or "/".join(item.nested_key) for h in history for item in h.item}
        assert TAGS <= keys and [h.step.num for h in history] == sorted(set(h.step.num for h in history))
        assert set(json.loads((entry / "stage.json").read_text())["outputs"]).isdisjoint({"tensorboard", "wandb"})
    assert {p.name for p in (workdir / "pseudolabel").iterdir()}.isdisjoint({"tensorboard", "wandb"})

    # [log] is outside every fingerprint: with it off the same entries are fresh, and a rerun verifies
    # their outputs (the extra event files do not disturb that) and reuses them.
    status = run_cli("status", "--config", SMOKE, "--workdir", workdir).stdout
    assert [line.split(":")[1].split()[0] for line in status.splitlines()
            if line.startswith(("teacher:", "pseudolabel:", "mart:"))] == ["fresh"] * 3, status
    rerun = run_cli("run", "--config", SMOKE, "--workdir", workdir).stdout
    assert all(f"{stage}: cached" in rerun for stage in ("teacher", "pseudolabel", "mart")), rerun

    report = run_cli("report", "--config", SMOKE, "--workdir", workdir)
    assert (workdir / "report.html").stat().st_size > 0 and "report.html" in report.stdout
