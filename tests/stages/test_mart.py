import numpy as np
import pytest

from data.pseudolabel_file import PseudoLabelReader
from pipeline.config import load_config
from pipeline.core.errors import UserError
from stages import mart
from tests.data.test_pseudolabel_file import SHAPE, N, make_pool, write_file


@pytest.fixture
def reader(tmp_path):
    src = make_pool()
    write_file(tmp_path / "pseudolabels.h5", src)
    return PseudoLabelReader(tmp_path / "pseudolabels.h5"), src


def test_pool_in_memory_limit_picks_ram_or_the_chunked_reader(reader):
    reader, src = reader
    size_gib = N * int(np.prod(SHAPE)) / 2**30
    in_ram = mart._pool_images(reader, "auto")  # 9.6 KB fits a quarter of any machine's free RAM
    assert isinstance(in_ram, np.ndarray) and np.array_equal(in_ram, src["images"])
    assert isinstance(mart._pool_images(reader, str(size_gib)), np.ndarray)  # exactly at the limit
    assert mart._pool_images(reader, str(size_gib / 2)) is reader
    assert mart._pool_images(reader, "0") is reader
    # Both paths hand the loader the same images, duplicates and order included.
    rows = np.array([3, 3, 0, 49, 17])
    assert np.array_equal(reader.gather(rows), in_ram[rows])


@pytest.mark.parametrize("value", ["lots", "-1"])
def test_pool_in_memory_must_be_auto_or_gib(value):
    with pytest.raises(UserError, match="pool_in_memory"):
        load_config(None, [f"mart.pool_in_memory={value}"])
    assert load_config(None, ["mart.pool_in_memory=2.5"]).mart.pool_in_memory == "2.5"


def test_recipe_options_are_off_by_default_and_reach_the_recipe():
    options = mart.recipe_options(load_config(None).mart)
    assert options["targets"].plain and options["pool_cutmix"] == 0.0
    cfg = load_config(None, ["mart.label_smoothing=0.1", "mart.pool_label_smoothing=0.2", "mart.pool_cutmix=0.5",
                             "mart.pool_loss_weight=0.3"]).mart
    options = mart.recipe_options(cfg)
    t = options["targets"]
    smoothing_and_weights = (t.label_smoothing, t.pool_label_smoothing, t.pool_loss_weight, options["pool_cutmix"])
    assert smoothing_and_weights == (0.1, 0.2, 0.3, 0.5)


@pytest.mark.parametrize("setting", ["mart.label_smoothing=1.0", "mart.pool_label_smoothing=-0.1",
                                     "mart.pool_cutmix=1.5", "mart.pool_loss_weight=-1"])
def test_recipe_options_out_of_range_are_refused(setting):
    with pytest.raises(UserError, match=setting.split("=")[0].replace(".", r"\.")):
        load_config(None, [setting])
