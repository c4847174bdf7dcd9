"""Importing foreign checkpoints (ours, bare, RobustBench, MART, RST layouts) and exporting to RobustBench:
every accepted layout gives the logits of the model it came from, every refusal is a UserError naming
the file and the fix."""
import importlib.util
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ml.checkpoints import (
    checkpoint_digest,
    export_checkpoint,
    import_checkpoint,
    load_model,
    normalization_stats,
    save_model,
)
from ml.models import DATASET_STATS, build_model
from pipeline.core.errors import UserError
from pipeline.core.fingerprint import file_digest

CIFAR_MEAN, CIFAR_STD = DATASET_STATS["cifar10"]
# RST's NormalizeInput default (the widely copied CIFAR std), not ours: the import must keep the file's.
RST_MEAN, RST_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and biases, so a layer loaded into the wrong place changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            elif isinstance(module, nn.Linear):
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model.eval()


def images(channels: int, size: int = 32, n: int = 3) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def normalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def trades_wrn_weights(net: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The TRADES/MART/RST WideResNet's state dict: ours plus the unused `sub_block1` (a copy of block1's
    shapes, filled with other values so that loading it anywhere would show)."""
    weights = OrderedDict(net.state_dict())
    for key, value in list(weights.items()):
        if key.startswith("block1."):
            weights["sub_block1." + key[len("block1."):]] = torch.full_like(value, 7)
    return weights


@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(0)
    return trained_looking(build_model("wrn-16-4", num_classes=10, in_channels=3).net)


# -- import ----------------------------------------------------------------------------------------

def test_own_model_pt_round_trips_with_its_normalisation(tmp_path):
    torch.manual_seed(0)
    model = trained_looking(build_model("tiny-cnn", num_classes=7, in_channels=1, mean=[0.3], std=[0.4]))
    save_model(tmp_path / "model.pt", model, arch="tiny-cnn", num_classes=7, in_channels=1, mean=[0.3], std=[0.4])
    imported = import_checkpoint(tmp_path / "model.pt", arch="tiny-cnn", num_classes=7, in_channels=1)
    assert not imported.training
    assert normalization_stats(imported) == ([pytest.approx(0.3)], [pytest.approx(0.4)])
    x = images(1, 28)
    assert torch.equal(logits(imported, x), logits(model, x))


@pytest.mark.parametrize("kwargs, named", [
    (dict(arch="small-cnn", num_classes=7, in_channels=1), "arch='tiny-cnn'"),
    (dict(arch="tiny-cnn", num_classes=10, in_channels=1), "num_classes=7"),
    (dict(arch="tiny-cnn", num_classes=7, in_channels=3), "in_channels=1"),
])
def test_own_model_pt_of_another_shape_is_refused(tmp_path, kwargs, named):
    model = build_model("tiny-cnn", num_classes=7, in_channels=1)
    save_model(tmp_path / "model.pt", model, arch="tiny-cnn", num_classes=7, in_channels=1, mean=[0.5], std=[0.25])
    with pytest.raises(UserError, match="model.pt") as e:
        import_checkpoint(tmp_path / "model.pt", **kwargs)
    assert named in str(e.value) and "teacher.arch" in str(e.value)


@pytest.mark.parametrize("prefix", ["", "net.", "module.net.", "module."])
def test_plain_state_dict_takes_unit_inputs_unless_told(tmp_path, prefix):
    torch.manual_seed(0)
    net = trained_looking(build_model("tiny-cnn", num_classes=10, in_channels=1).net)
    torch.save({prefix + k: v for k, v in net.state_dict().items()}, tmp_path / "w.pt")
    x = images(1, 28)

    plain = import_checkpoint(tmp_path / "w.pt", arch="tiny-cnn", num_classes=10, in_channels=1)
    assert torch.equal(logits(plain, x), logits(net, x))  # RobustBench convention: [0, 1] straight in

    mean, std = DATASET_STATS["fashion-mnist"]
    named = import_checkpoint(tmp_path / "w.pt", arch="tiny-cnn", num_classes=10, in_channels=1,
                              input_normalization="fashion-mnist")
    pair = import_checkpoint(tmp_path / "w.pt", arch="tiny-cnn", num_classes=10, in_channels=1, mean=mean, std=std)
    listed = import_checkpoint(tmp_path / "w.pt", arch="tiny-cnn", num_classes=10, in_channels=1,
                               input_normalization=["fashion-mnist"])  # the config's list form
    expected = logits(net, normalized(x, mean, std))
    for model in (named, pair, listed):
        assert torch.allclose(logits(model, x), expected, atol=1e-5)
    for unit in ([], "none"):
        model = import_checkpoint(tmp_path / "w.pt", arch="tiny-cnn", num_classes=10, in_channels=1,
                                  input_normalization=unit)
        assert torch.equal(logits(model, x), logits(net, x))


@pytest.mark.parametrize("layout", ["robustbench-carmon", "mart-official", "mart-dataparallel",
                                    "model_state_dict", "rst-normalize-input", "robustbench-normalize-model"])
def test_foreign_wrn_layouts_give_the_source_logits(tmp_path, wrn, layout):
    weights = trades_wrn_weights(wrn)
    module = OrderedDict(("module." + k, v) for k, v in weights.items())
    norm = OrderedDict([("mean", torch.tensor(RST_MEAN).view(1, 3, 1, 1)),
                        ("std", torch.tensor(RST_STD).view(1, 3, 1, 1))])
    checkpoint, stats = {
        # RobustBench's Carmon2019Unlabeled / Wang2020Improving files: DataParallel keys under state_dict.
        "robustbench-carmon": ({"state_dict": module}, None),
        # MART's train_wideresnet.py: torch.save(model.state_dict()), with or without DataParallel.
        "mart-official": (weights, None),
        "mart-dataparallel": (module, None),
        "model_state_dict": ({"epoch": 76, "model_state_dict": weights, "optimizer": {}}, None),
        # RST's robust_self_training.py with --normalize_input: Sequential(NormalizeInput(), model) in DataParallel.
        "rst-normalize-input": ({"num_classes": 10, "normalize_input": True, "state_dict": OrderedDict(
            [("module.0." + k, v) for k, v in norm.items()] + [("module.1." + k, v) for k, v in weights.items()])},
            (RST_MEAN, RST_STD)),
        # RobustBench's normalize_model(net, mean, std) saved whole.
        "robustbench-normalize-model": (OrderedDict(
            [("normalize." + k, v) for k, v in norm.items()] + [("model." + k, v) for k, v in weights.items()]),
            (RST_MEAN, RST_STD)),
    }[layout]
    torch.save(checkpoint, tmp_path / "foreign.pt")
    imported = import_checkpoint(tmp_path / "foreign.pt", arch="wrn-16-4", num_classes=10, in_channels=3)
    x = images(3)
    expected = logits(wrn, x if stats is None else normalized(x, *stats))
    assert torch.allclose(logits(imported, x), expected, atol=1e-5)
    if stats is not None:
        mean, std = normalization_stats(imported)
        assert mean == pytest.approx(stats[0]) and std == pytest.approx(stats[1])


def test_recorded_normalisation_and_a_different_given_one_is_refused(tmp_path, wrn):
    torch.save(OrderedDict([("0.mean", torch.tensor(RST_MEAN)), ("0.std", torch.tensor(RST_STD))]
                           + [("1." + k, v) for k, v in wrn.state_dict().items()]), tmp_path / "rst.pt")
    with pytest.raises(UserError, match=r"rst\.pt carries its own input normalisation"):
        import_checkpoint(tmp_path / "rst.pt", arch="wrn-16-4", num_classes=10, in_channels=3,
                          input_normalization="cifar10")
    # The same statistics given again are fine.
    import_checkpoint(tmp_path / "rst.pt", arch="wrn-16-4", num_classes=10, in_channels=3,
                      input_normalization=(RST_MEAN, RST_STD))


def test_pickled_module_is_refused_with_the_resave_fix(tmp_path):
    torch.save(build_model("tiny-cnn", num_classes=10, in_channels=1), tmp_path / "whole.pt")
    fix = r"torch\.save\(model\.state_dict\(\)"
    with pytest.raises(UserError, match=r"whole\.pt holds pickled .*torch\.nn\.modules.*" + fix):
        import_checkpoint(tmp_path / "whole.pt", arch="tiny-cnn", num_classes=10, in_channels=1)


@pytest.mark.parametrize("content, match", [
    (b"not a torch file", "could not be read"),
    (None, "does not exist"),
])
def test_unreadable_or_missing_file(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=match) as e:
        import_checkpoint(path, arch="tiny-cnn", num_classes=10, in_channels=1)
    assert "bad.pt" in str(e.value)


def test_no_state_dict_inside(tmp_path):
    torch.save({"epoch": 3, "notes": "weights elsewhere"}, tmp_path / "meta.pt")
    with pytest.raises(UserError, match=r"meta\.pt holds no state dict .*'epoch'"):
        import_checkpoint(tmp_path / "meta.pt", arch="tiny-cnn", num_classes=10, in_channels=1)


def test_wrong_class_count_names_the_layer(tmp_path, wrn):
    torch.save({"state_dict": wrn.state_dict()}, tmp_path / "c10.pt")
    with pytest.raises(UserError) as e:
        import_checkpoint(tmp_path / "c10.pt", arch="wrn-16-4", num_classes=100, in_channels=3)
    message = str(e.value)
    assert "c10.pt" in message and "'wrn-16-4'" in message and "100 classes" in message
    assert "fc.weight (10, 256) in the file, (100, 256) in wrn-16-4" in message


def test_wrong_architecture_names_a_few_keys(tmp_path):
    torch.save(build_model("tiny-cnn", num_classes=10, in_channels=3).net.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(UserError) as e:
        import_checkpoint(tmp_path / "tiny.pt", arch="resnet18", num_classes=10, in_channels=3)
    message = str(e.value)
    assert "tiny.pt" in message and "'resnet18'" in message
    assert "missing: conv1.weight" in message and "unexpected: 0.weight" in message
    assert "more" in message  # capped, not hundreds of keys
    assert len(message) < 1000


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_normalization="imagenet"), "Unknown input normalisation 'imagenet'"),
    (dict(input_normalization=([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])), "1 input channel"),
    (dict(input_normalization=([0.5], [0.0])), "std positive"),
    (dict(input_normalization="nonsense-pair-of-three"), "Unknown input normalisation"),
    (dict(input_normalization=(1, 2, 3)), "neither a dataset name nor a"),
    (dict(mean=[0.5]), "both mean and std"),
    (dict(input_normalization="fashion-mnist", mean=[0.5], std=[0.2]), "given twice"),
])
def test_bad_normalisation_arguments(tmp_path, kwargs, match):
    torch.save(build_model("tiny-cnn", num_classes=10, in_channels=1).net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match=match):
        import_checkpoint(tmp_path / "w.pt", arch="tiny-cnn", num_classes=10, in_channels=1, **kwargs)


def test_old_checkpoints_without_batchnorm_counters_load(tmp_path):
    net = trained_looking(build_model("tiny-cnn", num_classes=10, in_channels=1).net)
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")},
               tmp_path / "old.pt")
    imported = import_checkpoint(tmp_path / "old.pt", arch="tiny-cnn", num_classes=10, in_channels=1)
    assert torch.equal(logits(imported, images(1, 28)), logits(net, images(1, 28)))


def test_checkpoint_digest_is_the_file_digest(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    assert checkpoint_digest(tmp_path / "w.pt") == file_digest(tmp_path / "w.pt")
    with pytest.raises(UserError, match="nope.pt does not exist"):
        checkpoint_digest(tmp_path / "nope.pt")


# -- export ----------------------------------------------------------------------------------------

def saved_wrn(tmp_path: Path, wrn: nn.Module, arch="wrn-16-4", mean=CIFAR_MEAN, std=CIFAR_STD) -> Path:
    model = build_model(arch, num_classes=10, in_channels=3, mean=mean, std=std)
    model.net.load_state_dict(wrn.state_dict())
    save_model(tmp_path / "model.pt", model, arch=arch, num_classes=10, in_channels=3, mean=mean, std=std)
    return tmp_path / "model.pt"


def test_export_then_import_gives_identical_logits(tmp_path, wrn):
    model_pt = saved_wrn(tmp_path, wrn)
    note = export_checkpoint(model_pt, tmp_path / "out" / "rb.pt", format="robustbench")
    exported = torch.load(tmp_path / "out" / "rb.pt", weights_only=True)
    assert set(exported["state_dict"]) == set(wrn.state_dict())  # "net." stripped, nothing else
    assert exported["normalization"] == {"mean": pytest.approx(list(CIFAR_MEAN)), "std": pytest.approx(list(CIFAR_STD))}
    assert exported["robustbench_model"].endswith("wide_resnet.WideResNet(depth=16, widen_factor=4, num_classes=10)")
    assert "normalize_model" in note and note == exported["note"]

    x = images(3)
    reference = logits(load_model(model_pt), x)
    reimported = import_checkpoint(tmp_path / "out" / "rb.pt", arch="wrn-16-4", num_classes=10, in_channels=3)
    assert torch.equal(logits(reimported, x), reference)
    # What a RobustBench user does with the file: the bare network on normalised inputs.
    bare = build_model("wrn-16-4", num_classes=10, in_channels=3).net
    bare.load_state_dict(exported["state_dict"], strict=True)
    assert torch.allclose(logits(bare, normalized(x, CIFAR_MEAN, CIFAR_STD)), reference, atol=1e-5)


def test_export_of_unit_normalised_model_says_no_wrapping(tmp_path, wrn):
    note = export_checkpoint(saved_wrn(tmp_path, wrn, mean=(0.0,) * 3, std=(1.0,) * 3), tmp_path / "rb.pt")
    assert "no normalisation is needed" in note


@pytest.mark.parametrize("arch, channels, match", [
    ("tiny-cnn", 3, "tiny-cnn, which has no RobustBench counterpart"),
    ("wrn-16-4", 1, "takes 1 input channel"),
])
def test_export_refuses_what_robustbench_cannot_load(tmp_path, arch, channels, match):
    model = build_model(arch, num_classes=10, in_channels=channels)
    save_model(tmp_path / "model.pt", model, arch=arch, num_classes=10, in_channels=channels,
               mean=[0.5] * channels, std=[0.25] * channels)
    with pytest.raises(UserError, match=match):
        export_checkpoint(tmp_path / "model.pt", tmp_path / "rb.pt")
    assert not (tmp_path / "rb.pt").exists()


def test_export_refuses_unknown_format_and_foreign_input(tmp_path, wrn):
    with pytest.raises(UserError, match="Unknown export format 'onnx'"):
        export_checkpoint(saved_wrn(tmp_path, wrn), tmp_path / "x.onnx", format="onnx")
    torch.save(wrn.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(UserError, match=r"bare\.pt is not an rst-mart model\.pt"):
        export_checkpoint(tmp_path / "bare.pt", tmp_path / "rb.pt")


def test_the_cli_exports_through_the_library_and_refuses_an_unknown_format(tmp_path, wrn):
    """`python -m pipeline export`: the engine reaches the ML library's exporter by name (pipeline/library.py)."""
    from tests.conftest import run_cli

    model_pt = saved_wrn(tmp_path, wrn)
    proc = run_cli("export", model_pt, "-o", tmp_path / "rb.pt")
    assert proc.stdout.startswith(f"wrote {tmp_path / 'rb.pt'}") and "normalize_model" in proc.stdout
    assert set(torch.load(tmp_path / "rb.pt", weights_only=True)["state_dict"]) == set(wrn.state_dict())
    refused = run_cli("export", model_pt, "--format", "onnx", "-o", tmp_path / "x.onnx", check=False)
    assert refused.returncode == 2 and "Unknown export format 'onnx'" in refused.stderr
    assert not (tmp_path / "x.onnx").exists()


# -- against RobustBench's own classes -------------------------------------------------------------

def robustbench_architectures():
    """RobustBench's architecture modules, loaded from the installed package's files: its top-level
    import pulls in timm, gdown and autoattack, which the architectures themselves do not need."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the robustbench package is not installed (pip install --no-deps robustbench)")
    root = Path(list(spec.submodule_search_locations)[0]) / "model_zoo" / "architectures"
    modules = {}
    for name in ("wide_resnet", "resnet", "utils_architectures"):
        module_spec = importlib.util.spec_from_file_location(f"_robustbench_{name}", root / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(modules[name])
    return modules


@pytest.mark.parametrize("arch", ["wrn-16-4", "wrn-28-10", "resnet18", "preact-resnet18"])
def test_export_loads_strictly_into_robustbench(tmp_path, arch):
    rb = robustbench_architectures()
    torch.manual_seed(0)
    model = trained_looking(build_model(arch, num_classes=10, in_channels=3, mean=CIFAR_MEAN, std=CIFAR_STD))
    save_model(tmp_path / "model.pt", model, arch=arch, num_classes=10, in_channels=3, mean=CIFAR_MEAN, std=CIFAR_STD)
    export_checkpoint(tmp_path / "model.pt", tmp_path / "rb.pt")
    exported = torch.load(tmp_path / "rb.pt", weights_only=True)

    # "robustbench.model_zoo.architectures.<module>.<constructor call>": evaluated as a user would write it.
    module_name, call = exported["robustbench_model"].removeprefix("robustbench.model_zoo.architectures.").split(".", 1)
    net = eval(call, vars(rb[module_name]))
    net.load_state_dict(exported["state_dict"], strict=True)
    wrapped = rb["utils_architectures"].normalize_model(net, exported["normalization"]["mean"],
                                                        exported["normalization"]["std"])
    x = images(3, n=2)
    assert torch.allclose(logits(wrapped, x), logits(model, x), atol=1e-4)


def test_robustbench_wrn_with_sub_block1_imports(tmp_path):
    """RobustBench's own WideResNet(sub_block1=True), saved as its Carmon2019Unlabeled file is (DataParallel
    keys under state_dict), gives RobustBench's logits on [0, 1] inputs once imported."""
    rb = robustbench_architectures()
    torch.manual_seed(0)
    net = trained_looking(rb["wide_resnet"].WideResNet(depth=16, widen_factor=4, sub_block1=True))
    assert any(k.startswith("sub_block1.") for k in net.state_dict())
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "Carmon.pt")
    imported = import_checkpoint(tmp_path / "Carmon.pt", arch="wrn-16-4", num_classes=10, in_channels=3)
    x = images(3, n=2)
    assert torch.allclose(logits(imported, x), logits(net, x), atol=1e-5)
