"""The generate stage under torchrun (2 CPU processes on gloo, through the CLI): each rank makes its own
shards, the stage is committed once, and the pool is the one a single process makes."""
from tests.conftest import ROOT, SMOKE, run_cli
from tests.distributed.test_torchrun import torchrun
from tests.stages.generator_fixture import read_pool, save_tiny_generator


def test_ranks_make_their_own_shards_of_the_single_process_pool(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    generator = save_tiny_generator(tmp_path / "diffusion") / "model"
    settings = ["--set", "run.device=cpu", "--set", f"diffusion.checkpoint={generator}", "--set", "generate.n=40",
                "--set", "generate.steps=3", "--set", "generate.shard_size=8", "--set", "generate.batch_size=8"]
    proc = torchrun("-m", "pipeline", "run", "--config", SMOKE, "--workdir", tmp_path / "ranks", "--stages",
                    "generate", *settings, env={**env, "RST_MART_STORE": str(tmp_path / "store-ranks")})
    assert proc.stdout.count("generate: ran in") == 1  # one commit, printed by rank 0
    run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "one", "--stages", "generate", *settings,
            env={**env, "RST_MART_STORE": str(tmp_path / "store-one")})
    ranks, ranks_labels = read_pool(tmp_path / "ranks" / "generate")
    one, one_labels = read_pool(tmp_path / "one" / "generate")
    assert ranks.shape == (40, 28, 28, 1) and (ranks == one).all() and (ranks_labels == one_labels).all()


def test_pseudolabel_keeps_the_most_confident_of_a_generated_pool_under_torchrun(tmp_path):
    import h5py
    import numpy as np

    from data.pseudolabel_file import validate_pseudolabels

    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RST_MART_STORE": str(tmp_path / "store")}
    generator = save_tiny_generator(tmp_path / "diffusion") / "model"
    settings = ["--set", "run.device=cpu", "--set", f"diffusion.checkpoint={generator}", "--set", "generate.n=60",
                "--set", "generate.steps=2", "--set", "generate.shard_size=16", "--set", "pool.provider=generate",
                "--set", "pool.limit=0", "--set", "teacher.epochs=1", "--set", "pseudolabel.batch_size=16",
                "--set", "pseudolabel.keep_top_fraction=0.25"]
    torchrun("-m", "pipeline", "run", "--config", SMOKE, "--workdir", tmp_path / "w", "--stages", "pseudolabel",
             *settings, env=env)
    entry = tmp_path / "w" / "pseudolabel"
    validate_pseudolabels(entry / "pseudolabels.h5")
    assert sorted(p.name for p in entry.iterdir()) == ["pseudolabels.h5", "quality.csv", "results.csv", "stage.json"]
    images, _ = read_pool(tmp_path / "w" / "generate")
    with h5py.File(entry / "pseudolabels.h5", "r") as f:
        kept, labels, confidence = f["pool_index"][()], f["labels"][()], f["confidence"][()]
        assert (np.diff(kept) > 0).all() and (f["images"][()] == images[kept]).all()
    assert 15 <= len(kept) < 60  # a quarter of each class, rounded up
    assert (confidence > 0).all() and len(labels) == len(kept)
