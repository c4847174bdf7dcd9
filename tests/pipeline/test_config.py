import dataclasses
import re
import subprocess
import sys
import typing

import pytest

from pipeline.config import CONFIG_DIR, DEFAULT_CONFIG, Config, load_config
from pipeline.config_checks import validate
from pipeline.core.errors import UserError
from stages.eval import EVAL_ATTACK, EVAL_MODELS
from stages.mart import check_against_labeled


def test_demo_config_loads_with_defaults_for_omitted_keys():
    config = load_config(DEFAULT_CONFIG)
    assert config.data.dataset == "fashion-mnist"
    assert config.mart.loss == "mart"
    assert config.run.checkpoint_every_s == 60.0  # omitted in demo.toml, so the dataclass default


def test_overrides_are_typed():
    config = load_config(DEFAULT_CONFIG, ["mart.beta=3", "run.compile=true", "teacher.epochs=5",
                                          "eval.attacks=clean,pgd20", "teacher.milestones=[3, 4]"])
    assert config.mart.beta == 3.0 and isinstance(config.mart.beta, float)
    assert config.run.compile is True
    assert config.teacher.epochs == 5
    assert config.eval.attacks == ["clean", "pgd20"]
    assert config.teacher.milestones == [3, 4]


def test_pool_extra_keys_go_to_the_provider():
    config = load_config(DEFAULT_CONFIG, ["pool.provider=npz", "pool.image_key=x", "pool.path=/tmp/p.npz"])
    assert config.pool.options == {"image_key": "x"}
    assert config.section("pool")["image_key"] == "x"
    assert config.pool.path == "/tmp/p.npz"


@pytest.mark.parametrize("override, fragment", [
    ("mart.betta=3", "unknown key `mart.betta`"),
    ("nosuch.key=1", "unknown section"),
    ("mart.epochs=ten", "`mart.epochs` must be int"),
    ("run.precision=fp8", "run.precision"),
    ("mart.unsup_fraction=1.5", "unsup_fraction"),
    ("mart.beta", "section.key=value"),
    ("pool.path=5", "`pool.path` must be str or a non-empty list of str, got 5"),
    ("pool.path=[]", "`pool.path` must be str or a non-empty list of str"),
    ("log.PACKAGES=1", "unknown key `log.PACKAGES`"),  # a class constant, not a key
])
def test_bad_overrides_are_user_errors(override, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        load_config(DEFAULT_CONFIG, [override])


def test_data_and_pool_are_declared_by_their_sources_and_a_stage_cannot_take_them(monkeypatch):
    from data.sources import LABELED, POOL
    from pipeline import config as config_module
    from pipeline import stage_registry
    from pipeline.stage import Stage

    sections = config_module.section_types()
    assert (sections["data"], sections["pool"]) == (LABELED.config, POOL.config)
    assert list(sections)[:5] == ["run", "log", "launcher", "data", "pool"]  # engine, sources, then stages

    @dataclasses.dataclass
    class Clash:
        limit: int = 0

    clash = Stage(name="clash", version=1, section="pool", outputs=(), run=lambda ctx: None, config=Clash)
    monkeypatch.setattr(stage_registry, "stages", lambda: {"clash": clash})
    with pytest.raises(UserError, match=r"the stage 'clash' declares the config section \[pool\], which is already"):
        config_module.section_types()


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[teacher]\nepochz = 3\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "epochz" in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "broken.toml"
    bad.write_text("[mart\nbeta = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)


# -- validation: every value checked before any stage runs -------------------------------------------------
@pytest.mark.parametrize("override", [
    "run.seed=-1", "run.num_workers=-1", "run.checkpoint_every_s=-1", "data.num_labeled=-1", "pool.limit=-1",
    "teacher.epochs=0", "teacher.batch_size=0", "teacher.lr=0", "teacher.momentum=1", "teacher.weight_decay=-1e-4",
    "pseudolabel.batch_size=0", "pseudolabel.dedup_threshold=0",
    "mart.epochs=0", "mart.epoch_size=-1", "mart.batch_size=0", "mart.lr=-0.1", "mart.lr=inf", "mart.momentum=-0.1",
    "mart.weight_decay=-1", "mart.beta=-1", "mart.epsilon=-1", "mart.epsilon=0", "mart.epsilon=nan",
    "mart.step_size=0", "mart.steps=0", "mart.unsup_fraction=-0.1", "mart.ema_decay=1", "mart.val_size=-1",
    "mart.eval_n=-1", "mart.eval_batch_size=0", "eval.n=-1", "eval.eps=-0.01", "eval.batch_size=0",
])
def test_out_of_range_values_are_refused_with_key_value_and_fix(override):
    key, value = override.split("=")
    with pytest.raises(UserError) as info:
        load_config(DEFAULT_CONFIG, [override])
    message = str(info.value)
    assert f"`{key}` is " in message and f"(set by --set {override})" in message and "it must be" in message
    assert f"--set {key}=VALUE" in message  # the fix
    assert "\n" not in message


@pytest.mark.parametrize("override", [
    "run.seed=9223372036854775808", "run.seed=99999999999999999999999", "run.num_workers=65",
    "data.num_labeled=9223372036854775808", "pool.limit=99999999999999999999999",
    "run.checkpoint_every_s=inf", "run.checkpoint_every_s=nan",
])
def test_engine_values_beyond_what_numpy_and_torch_take_are_refused(override):
    key, value = override.split("=")
    with pytest.raises(UserError) as info:
        load_config(DEFAULT_CONFIG, [override])
    message = str(info.value)
    assert message.startswith(f"`{key}` is ") and f"(set by --set {override})" in message and "it must be" in message
    assert "\n" not in message


@pytest.mark.parametrize("override", [
    "run.seed=9223372036854775807", "run.num_workers=64", "data.num_labeled=9223372036854775807",
    "pool.limit=9223372036854775807", "run.checkpoint_every_s=1e9",
])
def test_the_largest_engine_values_are_accepted(override):
    load_config(DEFAULT_CONFIG, [override])


@pytest.mark.parametrize("overrides, unused", [
    (["pool.path=pool.npz"], "pool.path"),  # the default provider, labeled-remainder, reads no file
    (["pool.image_key=x"], "pool.image_key"),
    (["pool.provider=npz", "pool.path=p.npz", "pool.dataset=images"], "pool.dataset"),  # an hdf5 option
    (["pool.provider=folder", "pool.path=imgs", "pool.labels_path=l.npy"], "pool.labels_path"),
])
def test_pool_keys_the_provider_does_not_take_are_refused_before_any_stage(overrides, unused):
    with pytest.raises(UserError) as info:
        load_config(DEFAULT_CONFIG, overrides)
    message = str(info.value)
    assert message.startswith("`pool.provider` is ") and f"{unused} is set too, and would be ignored" in message
    assert f"Remove {unused}" in message and "\n" not in message


def test_pool_keys_a_provider_takes_and_plugin_keys_pass_the_config_check():
    load_config(DEFAULT_CONFIG, ["pool.provider=npz", "pool.path=p.npz", "pool.image_key=x", "pool.label_key=y"])
    load_config(DEFAULT_CONFIG, ["pool.provider=rst-pickle", "pool.path=p.pickle", "pool.cache_dir=/tmp/c"])
    # A plugin's keys are checked when it is constructed (importing it here could be slow).
    load_config(DEFAULT_CONFIG, ["pool.provider=my_pools:make", "pool.anything=1"])


def test_every_number_has_a_range():
    from pipeline import config

    # Every section, the engine's, the data sources' and the stages', declares its ranges (RANGES).
    ranges = {f"{section}.{key}" for section, kind in config.section_types().items()
              for key in getattr(kind, "RANGES", {})}
    numbers = {f"{section}.{f.name}" for section, kind in config.section_types().items()
               for f in dataclasses.fields(kind) if typing.get_type_hints(kind)[f.name] in (int, float)}
    assert numbers - ranges == set()


@pytest.mark.parametrize("override, fragment", [
    ("teacher.epochs=99999999999999999999999", "it must be a 64-bit integer in [1, 1000000]"),
    ("mart.epochs=10000000", "in [1, 1000000]"),
    ("mart.batch_size=9223372036854775808", "64-bit integer"),
    ("eval.n=99999999999999999999999", "64-bit integer"),
    ("mart.epsilon=1e308", "it must be a finite number in (0, 1]"),
    ("mart.step_size=2", "in (0, 1]"),
    ("eval.eps=1.5", "in [0, 1]"),
    ("eval.attacks=[]", "it names no attack"),
    ("mart.loss=mse", "it must be one of mart, trades, pgd-at"),
])
def test_stage_sections_refuse_values_beyond_their_bounds(override, fragment):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=re.escape(fragment)) as info:
        load_config(DEFAULT_CONFIG, [override])
    assert f"`{key}` is " in str(info.value) and "\n" not in str(info.value)


def test_a_huge_integer_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "huge.toml"
    path.write_text("[teacher]\nepochs = 99999999999999999999999\n")
    with pytest.raises(UserError, match=re.escape(f"`teacher.epochs` is 99999999999999999999999 (set by config "
                                                  f"file {path}); it must be a 64-bit integer")):
        load_config(path)


@pytest.mark.parametrize("override", [
    "run.checkpoint_every_s=0", "mart.momentum=0", "mart.ema_decay=0.999", "mart.unsup_fraction=0",
    "mart.unsup_fraction=1", "mart.beta=0", "eval.eps=0", "eval.n=0", "mart.epsilon=1e-6", "pool.limit=0",
])
def test_boundary_values_are_accepted(override):
    load_config(DEFAULT_CONFIG, [override])


@pytest.mark.parametrize("override, fragment", [
    ('mart.milestones=[1.5,"x"]', "`mart.milestones` must be a list of int"),
    ("eval.sweep=a,b", "`eval.sweep` must be a list of float"),
    ("eval.sweep=[1, true]", "`eval.sweep` must be a list of float"),
    ("eval.attacks=[1, 2]", "`eval.attacks` must be a list of str"),
    ("pool.convert=[3]", "`pool.convert` must be a list of str"),
])
def test_list_items_must_have_the_declared_type(override, fragment):
    with pytest.raises(UserError, match=fragment):
        load_config(DEFAULT_CONFIG, [override])


def test_list_items_are_parsed_and_a_single_value_is_a_list_of_one():
    config = load_config(DEFAULT_CONFIG, ["eval.sweep=0.5,1", "mart.schedule=piecewise", "mart.milestones=12"])
    assert config.eval.sweep == [0.5, 1.0] and all(isinstance(m, float) for m in config.eval.sweep)
    assert config.mart.milestones == [12]


@pytest.mark.parametrize("section", ["teacher", "mart"])
def test_piecewise_schedule_needs_milestones_within_the_epochs(section):
    with pytest.raises(UserError, match=f"needs `{section}.milestones`"):
        load_config(DEFAULT_CONFIG, [f"{section}.schedule=piecewise", f"{section}.milestones=[]"])
    for milestone in (0, 10):
        with pytest.raises(UserError, match=rf"milestone {milestone} is outside 1\.\.9"):
            load_config(DEFAULT_CONFIG, [f"{section}.epochs=10", f"{section}.schedule=piecewise",
                                         f"{section}.milestones=[5, {milestone}]"])
    config = load_config(DEFAULT_CONFIG, [f"{section}.epochs=10", f"{section}.schedule=piecewise",
                                          f"{section}.milestones=[1, 9]"])
    assert getattr(config, section).milestones == [1, 9]


def test_defaults_and_every_shipped_config_are_valid():
    validate(Config(), world_size=1)  # the default mart.schedule is cosine: piecewise would need milestones
    assert Config().mart.schedule == "cosine"
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        load_config(path)


def test_val_size_must_leave_labeled_images_to_train_on():
    with pytest.raises(UserError, match="smaller than the 6000 labeled images"):
        load_config(DEFAULT_CONFIG, ["mart.val_size=6000"])  # demo: data.num_labeled = 6000
    config = load_config(DEFAULT_CONFIG, ["mart.val_size=5999"])
    config.data.num_labeled = 0  # all of the training split: known only once it is opened
    validate(config, world_size=1)
    with pytest.raises(UserError, match=r"`mart.val_size` is 5999; .* smaller than the 100 labeled images"):
        check_against_labeled(config, 100)
    check_against_labeled(config, 6000)


def test_training_batches_must_split_across_the_torchrun_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match=r"`teacher.batch_size` is 128 .* multiple of 3"):
        load_config(DEFAULT_CONFIG)
    load_config(DEFAULT_CONFIG, ["teacher.batch_size=129", "mart.batch_size=129"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    # 4 images = 2 labeled + 2 pool: each part split 4 ways leaves two ranks with nothing
    with pytest.raises(UserError, match="leaves some process an empty batch"):
        load_config(DEFAULT_CONFIG, ["mart.batch_size=4"])
    load_config(DEFAULT_CONFIG, ["mart.batch_size=8"])
    # evaluation and pseudo-labeling batches are not split across ranks: any size works
    load_config(DEFAULT_CONFIG, ["pseudolabel.batch_size=1021", "eval.batch_size=99", "mart.eval_batch_size=7"])


def test_eval_names_are_checked_before_any_stage():
    with pytest.raises(UserError, match="'pgd0' is not an attack"):
        load_config(DEFAULT_CONFIG, ["eval.attacks=clean,pgd0"])
    with pytest.raises(UserError, match="'best' is neither a model nor an existing file"):
        load_config(DEFAULT_CONFIG, ["eval.models=mart,best"])
    with pytest.raises(UserError, match="names no model"):
        load_config(DEFAULT_CONFIG, ["eval.models=[]"])
    with pytest.raises(UserError, match="is not a positive multiple of eps"):
        load_config(DEFAULT_CONFIG, ["eval.sweep=0.5,0"])


def test_eval_names_agree_with_the_eval_stage():
    from ml.robustness import AUTOATTACK_PARTS, build_attack
    from stages.eval import MODEL_FILES

    assert EVAL_MODELS == tuple(MODEL_FILES)
    for name in ("clean", "fgsm", "pgd1", "pgd20", "cw30", "autoattack", "autoattack-fast", *AUTOATTACK_PARTS,
                 "pgd0", "pgd", "cw", "pgd020", "PGD20", "pgd-20", "apgd", "aa"):
        try:
            build_attack(name, 0.03)
            stage_accepts = True
        except UserError:
            stage_accepts = False
        assert bool(EVAL_ATTACK.fullmatch(name)) == stage_accepts, name


@pytest.mark.parametrize("content, fragment", [
    (None, "is a directory"),
    ("[mart]\nbeta = 3  # caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 22)"),
])
def test_unreadable_config_files(tmp_path, content, fragment):
    path = tmp_path / "config.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(fragment)) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_config_file_without_read_permission(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text("[mart]\nbeta = 3\n")

    def denied(self):  # chmod 000 does not stop root, who runs these tests in CI
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr("pipeline.core.bounded.read_regular", lambda path, limit: denied(path))
    with pytest.raises(UserError, match=re.escape(f"config file {path} cannot be read (permission denied)")):
        load_config(path)


def test_config_module_does_not_import_torch():
    code = "import sys, pipeline.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=CONFIG_DIR.parent, check=True)
