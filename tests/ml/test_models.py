"""The zoo's parameter counts (built on the meta device: no memory, no time), shapes, and the
checkpoint format's round trip and refusals."""
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from ml.checkpoints import load_model, save_model
from ml.models import ARCHS, DATASET_STATS, Normalize, build_model, count_parameters
from pipeline.core.errors import UserError

# At 10 classes and 3 input channels. resnet18 / wrn-28-10 / wrn-34-10 are the published counts of
# the TRADES/MART reference models; preact-resnet18 is Rice et al.'s (with the final BatchNorm).
PARAMETER_COUNTS = {
    "tiny-cnn": 38_666,
    "small-cnn": 862_282,
    "resnet18": 11_173_962,
    "preact-resnet18": 11_172_170,
    "wrn-16-4": 2_748_890,
    "wrn-28-10": 36_479_194,
    "wrn-34-10": 46_160_474,
}


def meta_model(arch, **kw):
    with torch.device("meta"):
        return build_model(arch, **kw)


def test_every_arch_has_a_known_count():
    assert set(ARCHS) == set(PARAMETER_COUNTS)


@pytest.mark.parametrize("arch", sorted(PARAMETER_COUNTS))
def test_parameter_counts(arch):
    model = meta_model(arch, num_classes=10, in_channels=3)
    assert count_parameters(model) == PARAMETER_COUNTS[arch]
    # One input channel changes only the first conv (3x3 kernels, out channels 16/32/64).
    gray = meta_model(arch, num_classes=10, in_channels=1)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert count_parameters(model) - count_parameters(gray) == 2 * 9 * first_conv.out_channels


@pytest.mark.parametrize("arch", ["tiny-cnn", "small-cnn"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_small_models_forward_at_native_shapes(arch, shape):
    model = build_model(arch, num_classes=7, in_channels=shape[0]).eval()
    with torch.no_grad():
        assert model(torch.rand(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("arch", ["resnet18", "preact-resnet18", "wrn-16-4"])
def test_large_models_accept_28x28(arch):
    """Adaptive pooling instead of the reference's fixed avg_pool so Fashion-MNIST works too."""
    model = build_model(arch, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_layout_and_normalisation():
    model = build_model("tiny-cnn", num_classes=10, in_channels=3)
    assert isinstance(model, nn.Sequential) and list(dict(model.named_children())) == ["normalize", "net"]
    keys = list(model.state_dict())
    assert keys[:2] == ["normalize.mean", "normalize.std"]
    assert all(k.startswith(("normalize.", "net.")) for k in keys)
    assert model.normalize.mean.shape == (1, 3, 1, 1)
    assert model.normalize.mean.flatten().tolist() == [0.5] * 3
    assert model.normalize.std.flatten().tolist() == [0.25] * 3
    norm = Normalize([0.5], [0.25])
    assert norm(torch.ones(1, 1, 2, 2)).flatten().tolist() == [2.0] * 4
    mean, std = DATASET_STATS["fashion-mnist"]
    gray = build_model("tiny-cnn", in_channels=1, mean=mean, std=std)
    assert gray.normalize.std.flatten().tolist() == pytest.approx([0.3530])


def test_wrn_init_follows_the_reference():
    torch.manual_seed(0)
    net = build_model("wrn-16-4").net
    assert torch.all(net.fc.bias == 0)
    assert torch.all(net.bn1.weight == 1) and torch.all(net.bn1.bias == 0)
    conv = net.block3.layer[0].conv2  # 3x3, 256 out channels: std sqrt(2 / (9 * 256))
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 256)) ** 0.5, rel=0.05)


def test_bad_arch_and_stats_are_user_errors():
    with pytest.raises(UserError, match="wrn-34-10") as e:
        build_model("resnet-50")
    assert str(sorted(ARCHS)) in str(e.value)
    with pytest.raises(UserError, match="3 input channel"):
        build_model("tiny-cnn", in_channels=3, mean=[0.5])
    with pytest.raises(UserError, match="positive"):
        build_model("tiny-cnn", in_channels=1, std=[0.0])


def _trained_tiny(in_channels=1):
    model = build_model("tiny-cnn", num_classes=3, in_channels=in_channels, mean=[0.3], std=[0.4])
    model.train()
    with torch.no_grad():
        model(torch.rand(4, in_channels, 8, 8))  # moves the BN statistics off their defaults
    return model


def test_round_trip(tmp_path):
    model = _trained_tiny()
    path = tmp_path / "sub" / "model.pt"
    save_model(path, model, arch="tiny-cnn", num_classes=3, in_channels=1, mean=[0.3], std=[0.4],
               epoch=3, note="best", metrics={"acc": 0.5, "per_class": [1, 2, 3]})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["arch"] == "tiny-cnn" and raw["num_classes"] == 3 and raw["in_channels"] == 1
    assert raw["mean"] == pytest.approx([0.3]) and raw["std"] == pytest.approx([0.4])
    assert raw["epoch"] == 3 and raw["note"] == "best" and raw["metrics"]["per_class"] == [1, 2, 3]
    assert all(v.device.type == "cpu" for v in raw["state_dict"].values())

    loaded = load_model(path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


class _Wrapper(nn.Module):
    """Renames keys like DDP (attribute `module`) or torch.compile (attribute `_orig_mod`)."""

    def __init__(self, name, inner):
        super().__init__()
        self.add_module(name, inner)


@pytest.mark.parametrize("names", [["module"], ["_orig_mod"], ["module", "_orig_mod"]])
def test_wrapper_prefixes_are_stripped(tmp_path, names):
    model = _trained_tiny()
    wrapped = model
    for name in reversed(names):
        wrapped = _Wrapper(name, wrapped)
    assert next(iter(wrapped.state_dict())).startswith(names[0] + ".")
    path = tmp_path / "model.pt"
    save_model(path, wrapped, arch="tiny-cnn", num_classes=3, in_channels=1, mean=[0.3], std=[0.4])
    assert list(torch.load(path, weights_only=True)["state_dict"]) == list(model.state_dict())
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), model.eval()(x))


def test_extra_entries_must_be_plain_python(tmp_path):
    model = _trained_tiny()
    kw = dict(arch="tiny-cnn", num_classes=3, in_channels=1, mean=[0.3], std=[0.4])
    with pytest.raises(TypeError, match="optimizer"):
        save_model(tmp_path / "a.pt", model, optimizer={"lr": torch.tensor(0.1)}, **kw)
    with pytest.raises(TypeError, match="overwrite"):
        save_model(tmp_path / "b.pt", model, **kw, **{"state_dict": {}})
    assert not list(tmp_path.iterdir())


def test_unreadable_checkpoints_are_user_errors(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        load_model(missing)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint\xff" * 10)
    with pytest.raises(UserError, match=re.escape(str(corrupt))):
        load_model(corrupt)

    model = _trained_tiny()
    good = tmp_path / "good.pt"
    save_model(good, model, arch="tiny-cnn", num_classes=3, in_channels=1, mean=[0.3], std=[0.4])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match=re.escape(str(truncated))):
        load_model(truncated)

    not_checkpoint = tmp_path / "dict.pt"
    torch.save({"x": 1}, not_checkpoint)
    with pytest.raises(UserError, match=re.escape(str(not_checkpoint)) + ".*lacks the keys"):
        load_model(not_checkpoint)

    a_list = tmp_path / "list.pt"
    torch.save([1, 2], a_list)
    with pytest.raises(UserError, match=re.escape(str(a_list))):
        load_model(a_list)


def test_inconsistent_checkpoints_are_user_errors(tmp_path):
    model = _trained_tiny()
    good = torch.load(_save(tmp_path / "good.pt", model), weights_only=True)

    unknown_arch = tmp_path / "arch.pt"
    torch.save({**good, "arch": "vgg99"}, unknown_arch)
    with pytest.raises(UserError, match=re.escape(str(unknown_arch)) + ".*vgg99"):
        load_model(unknown_arch)

    wrong_classes = tmp_path / "classes.pt"
    torch.save({**good, "num_classes": 10}, wrong_classes)
    with pytest.raises(UserError, match=re.escape(str(wrong_classes)) + ".*does not match"):
        load_model(wrong_classes)

    # A stray DDP prefix left in a hand-made checkpoint still loads.
    prefixed = tmp_path / "prefixed.pt"
    torch.save({**good, "state_dict": OrderedDict(("module." + k, v) for k, v in good["state_dict"].items())},
               prefixed)
    assert count_parameters(load_model(prefixed)) == count_parameters(model)


def _save(path, model):
    save_model(path, model, arch="tiny-cnn", num_classes=3, in_channels=1, mean=[0.3], std=[0.4])
    return path


def test_count_parameters():
    assert count_parameters(nn.Linear(3, 2)) == 8
