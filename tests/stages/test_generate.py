"""The generate stage on a tiny real diffusers UNet: shards in the hdf5 pool format, image i from (seed, i),
balanced classes, shards made by any process, resume after SIGKILL, refusals of a model that cannot do what
the config asks."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from data.pools import open_pool
from pipeline.core.errors import UserError
from stages.generate import STAGE
from tests.conftest import ROOT
from tests.stages.generator_fixture import generate_config, read_pool, run_generate, save_tiny_generator


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return save_tiny_generator(tmp_path_factory.mktemp("diffusion"))


def test_shards_hold_the_pool_in_the_hdf5_pool_format(generator, tmp_path):
    config = generate_config(n=37)
    run_generate(generator, tmp_path / "g", config)
    names = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert names == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"] == list(STAGE.output_names(config))
    images, labels = read_pool(tmp_path / "g")
    assert images.shape == (37, 28, 28, 1) and images.dtype == np.uint8
    assert images.std() > 0  # sampled, not blank
    assert (labels == np.arange(37) % 10).all()  # balanced: every prefix has each class within one image
    with h5py.File(tmp_path / "g" / "shard-00002.h5", "r") as f:
        assert f.attrs["first_index"] == 32 and f.attrs["num_classes"] == 10 and f.attrs["sampler"] == "dpm-solver++"
    # What pool.provider = "hdf5" reads, conditioning classes as the provided labels.
    labeled = type("Labeled", (), {"image_shape": (28, 28, 1), "name": "tiny", "num_classes": 10})()
    pool = open_pool("hdf5", {"path": str(tmp_path / "g" / "shard-*.h5")}, labeled=labeled,
                     remainder_index=np.arange(0))
    assert len(pool) == 37 and (pool.read(0, 37) == images).all()
    assert (pool.provided_labels() == labels).all()


def test_a_larger_pool_starts_with_the_smaller_pool(generator, tmp_path):
    # 21 is not a multiple of the shard (16) or of the batch (8): the last batch is made full-size and cut.
    run_generate(generator, tmp_path / "small", generate_config(n=21))
    run_generate(generator, tmp_path / "large", generate_config(n=42))
    small, small_labels = read_pool(tmp_path / "small")
    large, large_labels = read_pool(tmp_path / "large")
    assert (small == large[:21]).all() and (small_labels == large_labels[:21]).all()
    other_seed = generate_config(n=21)
    other_seed.run.seed = 1
    run_generate(generator, tmp_path / "seed1", other_seed)
    assert not (read_pool(tmp_path / "seed1")[0] == small).all()


def test_any_process_makes_any_shard(generator, tmp_path):
    config = generate_config(n=60)  # 4 shards
    run_generate(generator, tmp_path / "one", config)
    run_generate(generator, tmp_path / "jobs", config, shard=(1, 3))
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["shard-00001.h5"]  # 1 % 3 == 1 only
    run_generate(generator, tmp_path / "jobs", config, shard=(0, 3))
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["shard-00000.h5", "shard-00001.h5",
                                                                      "shard-00003.h5"]
    run_generate(generator, tmp_path / "jobs", config)  # the finishing call makes what is still missing
    assert (read_pool(tmp_path / "jobs")[0] == read_pool(tmp_path / "one")[0]).all()


def test_unconditional_model(tmp_path):
    generator = save_tiny_generator(tmp_path / "diffusion", num_classes=0)
    with pytest.raises(UserError, match="generate.balanced = false"):
        run_generate(generator, tmp_path / "refused", generate_config(n=8))
    assert list((tmp_path / "refused").iterdir()) == []
    run_generate(generator, tmp_path / "g", generate_config(n=8, balanced=False))
    images, labels = read_pool(tmp_path / "g")
    assert images.shape == (8, 28, 28, 1) and labels is None  # the teacher's pseudo-labels label them


def test_unbalanced_classes_come_from_the_seed(generator, tmp_path):
    run_generate(generator, tmp_path / "a", generate_config(n=40, balanced=False))
    run_generate(generator, tmp_path / "b", generate_config(n=20, balanced=False))
    labels_a, labels_b = read_pool(tmp_path / "a")[1], read_pool(tmp_path / "b")[1]
    assert (labels_a[:20] == labels_b).all() and len(set(labels_a)) > 3 and not (labels_a == np.arange(40) % 10).all()


def test_steps_beyond_the_training_schedule_are_refused(generator, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(generator, short)
    config_file = short / "model" / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "num_train_timesteps": 10}))
    with pytest.raises(UserError, match="`generate.steps` is 11, more than the 10 timesteps"):
        run_generate(short, tmp_path / "g", generate_config(n=8, steps=11))
    assert list((tmp_path / "g").iterdir()) == []


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_other_samplers(generator, tmp_path, sampler):
    run_generate(generator, tmp_path / "g", generate_config(n=10, sampler=sampler, steps=3))
    run_generate(generator, tmp_path / "h", generate_config(n=10, sampler=sampler, steps=3))
    assert (read_pool(tmp_path / "g")[0] == read_pool(tmp_path / "h")[0]).all()  # deterministic


def _worker(generator, out_dir, n):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = [sys.executable, "-m", "tests.stages.generate_worker", str(generator), str(out_dir), str(n)]
    return subprocess.Popen(worker,
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_resume_after_sigkill_gives_the_uninterrupted_pool(generator, tmp_path):
    n = 64  # 8 shards of 8
    uninterrupted = _worker(generator, tmp_path / "whole", n)
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read().decode()
    killed = _worker(generator, tmp_path / "killed", n)
    deadline = time.monotonic() + 240
    while not (tmp_path / "killed" / "shard-00000.h5").exists():  # the first shard is on disk: kill mid-pool
        assert killed.poll() is None and time.monotonic() < deadline, "the worker ended before its first shard"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    made = sorted(p.name for p in (tmp_path / "killed").glob("shard-*.h5"))
    assert 1 <= len(made) < 8
    before = {name: (tmp_path / "killed" / name).stat() for name in made}
    resumed = _worker(generator, tmp_path / "killed", n)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    for name, st in before.items():  # kept, not made again
        after = (tmp_path / "killed" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert sorted(os.listdir(tmp_path / "killed")) == sorted(os.listdir(tmp_path / "whole"))  # no leftovers
    whole, whole_labels = read_pool(tmp_path / "whole")
    again, again_labels = read_pool(tmp_path / "killed")
    assert (whole == again).all() and (whole_labels == again_labels).all()


def test_outputs_follow_the_config():
    assert len(STAGE.output_names(generate_config(n=1_000_000, shard_size=10_000))) == 100
    assert STAGE.shards(STAGE.view(generate_config(n=17, shard_size=16))) == 2


def test_fp16_on_the_cpu_is_refused(generator, tmp_path):
    config = generate_config(n=8)
    config.run.precision, config.run.device = "fp16", "cpu"
    with pytest.raises(UserError, match="needs a CUDA device"):
        run_generate(generator, tmp_path / "g", config)
    assert list((tmp_path / "g").iterdir()) == []


def test_bf16_and_channels_last_paths_sample_the_same_pool_closely(generator, tmp_path):
    run_generate(generator, tmp_path / "fp32", generate_config(n=16))
    reference = read_pool(tmp_path / "fp32")[0].astype(int)
    for precision, channels_last, tolerance in (("fp32", True, 0.01), ("bf16", True, 2.0)):
        config = generate_config(n=16)
        config.run.precision, config.run.channels_last = precision, channels_last
        run_generate(generator, tmp_path / precision, config)
        images = read_pool(tmp_path / precision)[0]
        assert images.shape == reference.shape and np.abs(images - reference).mean() <= tolerance


def test_the_declared_samplers_are_the_ones_built():
    import ml.sampling
    import stages.generate

    assert stages.generate.SAMPLERS == ml.sampling.SAMPLERS  # declared twice: the declaration imports no torch


def test_a_full_disk_is_a_user_error_and_leaves_only_whole_shards(generator, tmp_path):
    from tests.conftest import small_disk

    with small_disk(tmp_path / "disk", "64k"):
        out = tmp_path / "disk" / "g"
        with pytest.raises(UserError, match="no space left on the device"):
            run_generate(generator, out, generate_config(n=200, steps=1, shard_size=16))
        made = sorted(p.name for p in out.iterdir())
        assert made and all(name.startswith("shard-") for name in made)  # no temporary file left behind
        for name in made:  # each one whole
            with h5py.File(out / name, "r") as f:
                assert f["images"].shape == (16, 28, 28, 1)
