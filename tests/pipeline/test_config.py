import pytest

from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.errors import UserError


def test_demo_config_loads_with_defaults_for_omitted_keys():
    config = load_config(DEFAULT_CONFIG)
    assert config.data.dataset == "fashion-mnist"
    assert config.mart.loss == "mart"
    assert config.run.checkpoint_every_s == 60.0  # omitted in demo.toml, so the dataclass default


def test_overrides_are_typed():
    config = load_config(DEFAULT_CONFIG, ["mart.beta=3", "run.compile=true", "teacher.epochs=2",
                                          "eval.attacks=clean,pgd20", "teacher.milestones=[3, 4]"])
    assert config.mart.beta == 3.0 and isinstance(config.mart.beta, float)
    assert config.run.compile is True
    assert config.teacher.epochs == 2
    assert config.eval.attacks == ["clean", "pgd20"]
    assert config.teacher.milestones == [3, 4]


def test_pool_extra_keys_go_to_the_provider():
    config = load_config(DEFAULT_CONFIG, ["pool.image_key=x", "pool.path=/tmp/p.npz"])
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
])
def test_bad_overrides_are_user_errors(override, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        load_config(DEFAULT_CONFIG, [override])


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
