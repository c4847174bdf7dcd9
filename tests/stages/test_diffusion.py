"""The diffusion stage: trains a class-conditional diffusers UNet on the labeled images only (resuming after
kill -9 to the same bytes), or imports a diffusers directory the user has; bad directories exit 2."""
import json

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, SMOKE, kill_when, run_cli

TINY = ["diffusion.block_out_channels=[8,16]", "diffusion.epochs=2", "diffusion.batch_size=50",
        "diffusion.sample_steps=2", "data.num_labeled=200"]


def sets(*pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("diffusion")
    env = {"RST_MART_STORE": str(base / "store")}  # its own store, shared by the tests that read it
    proc = run_cli("run", "--config", SMOKE, "--workdir", base / "w", "--stages", "diffusion", *sets(*TINY), env=env)
    return base / "w", proc, env


def tiny_unet(*, channels=1, size=28, classes=10):
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, layers_per_block=1,
                       num_class_embeds=classes or None, norm_num_groups=4, add_attention=False)


def test_trains_a_conditional_generator_on_the_labeled_images(trained):
    from ml.diffusion import load_generator

    workdir, proc, _ = trained
    assert "diffusion: ran in" in proc.stdout
    unet, schedule, info = load_generator(workdir / "diffusion" / "model")
    assert (info.num_classes, info.image_size, info.in_channels) == (10, 28, 1)
    assert info.class_names[0] == "T-shirt/top"
    assert schedule["num_train_timesteps"] == 1000
    import pandas as pd

    metrics = pd.read_csv(workdir / "diffusion" / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2] and np.isfinite(metrics["loss"]).all()
    assert metrics["loss"].iloc[-1] < 1.0  # the noise's variance: a model that learned nothing scores ~1
    assert (workdir / "diffusion" / "samples.png").stat().st_size > 0


def test_the_generator_never_depends_on_the_pool(trained):
    workdir, _, env = trained
    proc = run_cli("status", "--config", SMOKE, "--workdir", workdir, "--stages", "diffusion",
                   *sets(*TINY, "pool.limit=100", "teacher.epochs=5"), env=env)
    assert "diffusion: fresh" in proc.stdout


def test_kill_9_then_resume_gives_the_same_weights(trained, tmp_path):
    workdir = tmp_path / "w"
    args = ["--config", SMOKE, "--workdir", workdir, "--stages", "diffusion", *sets(*TINY, "run.checkpoint_every_s=0")]
    kill_when(args, lambda: list((tmp_path / "store" / "diffusion").glob("*.partial/diffusion_state.pt")))
    assert not (workdir / "diffusion").exists(), "the kill came too late to interrupt the stage"
    rerun = run_cli("run", "--config", SMOKE, "--workdir", workdir, "--stages", "diffusion",
                    *sets(*TINY, "run.checkpoint_every_s=0"))
    assert "resumed from checkpoint" in rerun.stdout
    weights = "diffusion/model/unet/diffusion_pytorch_model.safetensors"
    assert (workdir / weights).read_bytes() == (trained[0] / weights).read_bytes()


@pytest.mark.parametrize("layout", ["pipeline", "bare-unet"])
def test_imports_a_diffusers_directory(tmp_path, layout):
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    source = tmp_path / "ddpm"
    unet = tiny_unet()
    if layout == "pipeline":
        unet.save_pretrained(source / "unet", safe_serialization=True)
        DDPMScheduler(num_train_timesteps=500).save_pretrained(source / "scheduler")
    else:
        unet.save_pretrained(source, safe_serialization=True)
    workdir = tmp_path / "w"
    run_cli("run", "--config", SMOKE, "--workdir", workdir, "--stages", "diffusion",
            *sets(f"diffusion.checkpoint={source}", "diffusion.sample_steps=2"))
    model = workdir / "diffusion" / "model"
    imported = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    assert imported.keys() == unet.state_dict().keys()
    assert all(torch.equal(imported[k], v) for k, v in unet.state_dict().items())
    schedule = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert schedule["num_train_timesteps"] == (500 if layout == "pipeline" else 1000)
    assert json.loads((model / "rst_mart.json").read_text())["num_classes"] == 10
    assert (workdir / "diffusion" / "metrics.csv").read_text().startswith("epoch,step,loss")


def _pickles_only(directory):
    tiny_unet().save_pretrained(directory, safe_serialization=True)
    (directory / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(tiny_unet().state_dict(), directory / "diffusion_pytorch_model.bin")


BAD_DIRECTORIES = {
    "missing": (lambda d: None, "does not exist"),
    "no-config": (lambda d: d.mkdir(), "neither config.json nor unet/config.json"),
    "pickles-only": (_pickles_only, "only pickled weights"),
    "rgb": (lambda d: tiny_unet(channels=3).save_pretrained(d), "3-channel images"),
    "32px": (lambda d: tiny_unet(size=32).save_pretrained(d), "32x32 images"),
    "5-classes": (lambda d: tiny_unet(classes=5).save_pretrained(d), "conditioned on 5 classes"),
}


@pytest.mark.parametrize("case", sorted(BAD_DIRECTORIES))
def test_a_bad_directory_exits_2_and_creates_nothing(tmp_path, case):
    make, words = BAD_DIRECTORIES[case]
    source = tmp_path / "model"
    make(source)
    workdir = tmp_path / "w"
    proc = run_cli("run", "--config", SMOKE, "--workdir", workdir, "--stages", "diffusion",
                   *sets(f"diffusion.checkpoint={source}"), check=False)
    assert proc.returncode == 2, proc.stderr
    message = " ".join(proc.stderr.split())  # the paragraph is wrapped to the terminal
    assert words in message and "diffusion.checkpoint" in message
    assert "Traceback" not in proc.stderr
    assert not (workdir / "diffusion").exists()
    assert not list((tmp_path / "store").glob("diffusion/*"))


def test_the_sample_grid_is_a_row_per_class():
    from ml.diffusion import DEFAULT_SCHEDULE, GeneratorInfo, sample_grid

    info = GeneratorInfo(num_classes=10, class_names=(), image_size=28, in_channels=1)
    grid = sample_grid(tiny_unet().eval(), DEFAULT_SCHEDULE, info, per_class=3, steps=2, seed=0,
                       device=torch.device("cpu"))
    assert grid.shape == (10 * 28, 3 * 28, 1) and grid.dtype == np.uint8
    again = sample_grid(tiny_unet().eval(), DEFAULT_SCHEDULE, info, per_class=3, steps=2, seed=0,
                        device=torch.device("cpu"))
    assert np.array_equal(grid, again)
    assert not np.array_equal(grid[:28], grid[28:56])  # two classes from the same noise differ


def test_the_shipped_demo_generator_fits_fashion_mnist():
    """configs/demo_generated.toml imports it: a class-conditional 28x28x1 model, about 1 MB of safetensors."""
    from ml.diffusion import load_generator

    directory = ROOT / "generators" / "fashion-mnist-264k"
    unet, schedule, info = load_generator(directory)
    assert (info.num_classes, info.image_size, info.in_channels) == (10, 28, 1)
    assert sum(p.numel() for p in unet.parameters()) == 263_665
    assert (directory / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 1.2e6
