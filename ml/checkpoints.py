"""Checkpoint I/O in one module: our format saved, read and loaded; foreign checkpoints imported;
RobustBench checkpoints exported.

Our format (`save_model`, `load_model`): `model.pt` = {"arch", "num_classes", "in_channels", "mean", "std",
"state_dict", ...plain extras}, written atomically, read only with torch.load(weights_only=True)
(`read_checkpoint`, the one place a checkpoint file is loaded: models, imported weights, training state).

Import (`import_checkpoint`) turns any of these into our model (Normalize layer inside, [0, 1] inputs):
- our own `model.pt` (`save_model`'s dict: arch, num_classes, in_channels, mean, std, state_dict);
- a plain state dict of a zoo architecture, keys with or without our `net.` prefix;
- RobustBench, official MART and RST checkpoints: the weights under a top-level `state_dict` or
  `model_state_dict` key or bare, `module.` prefixes (DataParallel), the unused `sub_block1` of the
  TRADES-family WideResNet (RobustBench builds it for Carmon2019Unlabeled and Wang2020Improving),
  RST's `normalize_input` layout (`0.mean`, `0.std`, `1.<net>`), RobustBench's `normalize_model`
  layout (`normalize.mean`, `model.<net>`), and our own export (below).
A checkpoint that carries its normalisation (a layer's buffers, or our export's `normalization`
entry) is imported with it; otherwise the caller says how the model was trained: None for [0, 1]
inputs (the RobustBench convention), a dataset name or a (mean, std) pair for normalised inputs.

Export (`export_checkpoint`) writes `{"state_dict": <net weights without "net.">, "normalization":
{"mean", "std"}, "robustbench_model", "arch", "num_classes", "in_channels", "note"}`. RobustBench's
`load_model` reads `checkpoint["state_dict"]`, and those weights load strictly into the named
RobustBench architecture. That architecture takes [0, 1] inputs with no normalisation of its own,
while ours normalise inside; the normalisation is not folded into the first convolution because it
cannot be exactly: the convolution zero-pads, and a zero of the normalised input is the pixel value
`mean`, not 0, so the border outputs would change. The statistics travel alongside instead, and the
note says how to wrap the network with RobustBench's `normalize_model` to get our logits.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ml.models import DATASET_STATS, build_model
from pipeline.core.atomic import atomic_torch_save
from pipeline.core.bounded import NotRegularFile, open_regular
from pipeline.core.errors import UserError
from pipeline.core.fingerprint import file_digest

CHECKPOINT_KEYS = ("arch", "num_classes", "in_channels", "mean", "std", "state_dict")

# Wrappers that rename every key: DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrap parameter names

EXPORT_FORMATS = ("robustbench",)
EXPORT_LIMIT_BYTES = 8 << 30  # the largest model.pt export reads; torch.load holds the whole file in memory

# Keys under which checkpoints in the wild keep their weights, most specific first.
_STATE_DICT_ENTRIES = ("state_dict", "model_state_dict")
# DataParallel / DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
# (normaliser prefix, network prefix) of the layouts that carry their own input normalisation:
# ours and RobustBench's normalize_model, ours and RST's Sequential(NormalizeInput(), model).
_NORMALIZED_LAYOUTS = (("normalize.", "net."), ("normalize.", "model."), ("0.", "1."))
# A network saved without its normaliser may still carry our prefix.
_NET_PREFIXES = ("net.",)
# The TRADES/MART/RST WideResNet builds a block it never calls; RobustBench keeps it for their weights.
_UNUSED_PREFIXES = ("sub_block1.",)
_SHOWN_KEYS = 4  # offending keys quoted in a mismatch message
_STATS_TOLERANCE = 1e-5

# Our architectures whose state dict (without "net.") loads strictly into a RobustBench class with the
# same forward, at 3 input channels (RobustBench's stems are hard-wired to RGB): the module holding the
# class and the constructor call, {k} = the class count.
_ROBUSTBENCH_ARCHS = {
    "wrn-16-4": ("wide_resnet", "WideResNet(depth=16, widen_factor=4, num_classes={k})"),
    "wrn-28-10": ("wide_resnet", "WideResNet(depth=28, widen_factor=10, num_classes={k})"),
    "wrn-34-10": ("wide_resnet", "WideResNet(depth=34, widen_factor=10, num_classes={k})"),
    "resnet18": ("resnet", "ResNet(BasicBlock, [2, 2, 2, 2], num_classes={k})"),
    # Rice et al.'s layout: a final BatchNorm, and the 1x1 shortcut on the activated input.
    "preact-resnet18": ("resnet", "PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes={k}, "
                                  "bn_before_fc=True, out_shortcut=True)"),
}
_ROBUSTBENCH_MODULE = "robustbench.model_zoo.architectures"


# -- our format: save, read, load ---------------------------------------------------------------

def strip_prefixes(key: str, prefixes=WRAPPER_PREFIXES) -> str:
    """`key` without any of `prefixes`, however they are stacked ("module._orig_mod.net.x" -> "net.x")."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _check_plain(value: Any, where: str) -> None:
    """weights_only loading accepts only plain containers and scalars (and tensors, refused here
    because metadata should stay human-readable)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint entry {where} has a non-str key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"checkpoint entry {where} is a {type(value).__name__}; extra values must be "
                    "plain python (str/int/float/bool/None/list/dict) so weights_only loading works")


def save_model(path: str | os.PathLike, model: nn.Module, *, arch: str, num_classes: int,
               in_channels: int, mean: Sequence[float], std: Sequence[float], **extra: Any) -> None:
    """Write the public checkpoint format atomically; `model` may be wrapped by DDP or torch.compile."""
    clash = set(extra) & set(CHECKPOINT_KEYS)
    if clash:
        raise TypeError(f"extra checkpoint entries {sorted(clash)} would overwrite the model's own")
    for key, value in extra.items():
        _check_plain(value, key)
    state_dict = OrderedDict(
        (strip_prefixes(k), v.detach().cpu().clone()) for k, v in model.state_dict().items())
    checkpoint = {
        "arch": str(arch),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "state_dict": state_dict,
        **extra,
    }
    atomic_torch_save(checkpoint, path)


def read_checkpoint(path: str | os.PathLike, *, what: str = "Checkpoint",
                    fix: str = "Copy it again from its source.", map_location: Any = "cpu") -> Any:
    """The one place a checkpoint file is loaded (models, imported weights, training state): torch.load
    with weights_only=True (never unpickling code), every failure a UserError naming the file and the
    fix. `what` names the file in messages; `fix` says what to do about a missing, torn or foreign one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; check the path (relative to the directory you run "
                        f"from, or absolute), or run the stage that writes it.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            # torch's own advice (weights_only=False) would run arbitrary code from the file.
            raise UserError(
                f"{what} {path} holds pickled Python objects ({refused.group(1)}: a whole model or a "
                "custom class) that safe loading (torch.load with weights_only=True) refuses to execute. "
                "Re-save only the weights where the model's code is available: "
                "torch.save(model.state_dict(), 'weights.pt'), and point at that file.") from e
        raise _unreadable(what, path, e, fix) from e
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise _unreadable(what, path, e, fix) from e


def _unreadable(what: str, path: str, error: Exception, fix: str) -> UserError:
    # torch's own message suggests weights_only=False, which is wrong advice for a torn file.
    return UserError(f"{what} {path} could not be read as a weights-only torch checkpoint ({type(error).__name__}); "
                     f"the file is truncated, corrupt, not a torch file, or holds Python objects other than "
                     f"tensors and plain values. {fix}")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", channels_last: bool = False) -> nn.Module:
    """Rebuild the model a checkpoint describes, load its weights, move it to `device`, eval mode.

    channels_last changes only the weights' memory layout (faster oneDNN / cuDNN convolutions), not
    the arithmetic precision."""
    path = os.fspath(path)
    checkpoint = read_checkpoint(path, what="Model checkpoint",
                                 fix="Delete it and rerun the stage that writes it (or check the path).")
    if not isinstance(checkpoint, dict):
        raise UserError(f"Model checkpoint {path} holds a {type(checkpoint).__name__}, not a model "
                        f"checkpoint dict with keys {list(CHECKPOINT_KEYS)}.")
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise UserError(f"Model checkpoint {path} lacks the keys {missing}; it was not written by "
                        "rst-mart's save_model (a full training state or a bare state_dict?).")
    try:
        model = build_model(checkpoint["arch"], checkpoint["num_classes"], checkpoint["in_channels"],
                            checkpoint["mean"], checkpoint["std"])
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"Model checkpoint {path} describes no buildable model: {e}") from e
    if not isinstance(checkpoint["state_dict"], dict):
        raise UserError(f"Model checkpoint {path} has a {type(checkpoint['state_dict']).__name__} "
                        "where its state_dict should be.")
    state_dict = OrderedDict((strip_prefixes(k), v) for k, v in checkpoint["state_dict"].items())
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"Model checkpoint {path} does not match its architecture "
                        f"{checkpoint['arch']!r}: {str(e).splitlines()[0]}") from e
    model = model.to(device)
    return (model.to(memory_format=torch.channels_last) if channels_last else model).eval()


# -- import ----------------------------------------------------------------------------------------

def checkpoint_digest(path: str | os.PathLike) -> str:
    """The content digest a teacher imported from `path` is fingerprinted by."""
    if not Path(path).is_file():
        raise UserError(f"Checkpoint {os.fspath(path)} does not exist; check teacher.checkpoint (a path "
                        "relative to the directory you run from, or absolute).")
    return file_digest(path)


def import_checkpoint(path: str | os.PathLike, *, arch: str, num_classes: int, in_channels: int,
                      input_normalization: str | Sequence[Sequence[float]] | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """Our model (Normalize + `arch`, eval mode, on the CPU, taking [0, 1] inputs) with the weights of `path`.

    `input_normalization` says what the network expects, for checkpoints that do not carry it: None,
    "none" or [] for [0, 1] inputs; a dataset name ("cifar10", "fashion-mnist") or [name] for its
    statistics; or a (mean, std) pair of per-channel lists. `mean` and `std` are that pair as two
    arguments. A checkpoint that carries its own normalisation is imported with it, and a different
    one given here is refused."""
    path = os.fspath(path)
    checkpoint = read_checkpoint(path)
    _check_recorded_shape(path, checkpoint, arch=arch, num_classes=num_classes, in_channels=in_channels)
    weights, in_layer = _split_normalizer(_network_weights(path, checkpoint))
    # The entries of ours and of our export hold the statistics as given; the layer's float32 buffers
    # hold them rounded, and are all that other checkpoints have.
    recorded = _recorded_entries(path, checkpoint) or in_layer
    given = _given_normalization(path, input_normalization, mean, std)
    stats = _agree(path, recorded, given) or ([0.0] * in_channels, [1.0] * in_channels)
    for values, what in zip(stats, ("mean", "std")):
        if len(values) != in_channels:
            raise UserError(f"The input normalisation {what} {values} for checkpoint {path} has {len(values)} "
                            f"value(s) but the model takes {in_channels} input channel(s); give one per channel.")
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels, mean=stats[0], std=stats[1])
    _load_strict(path, model.net, weights, arch=arch, num_classes=num_classes)
    return model.eval()


def normalization_stats(model: nn.Module) -> tuple[list[float], list[float]]:
    """(mean, std) per channel of our model's Normalize layer, as save_model takes them."""
    return (model.normalize.mean.flatten().tolist(), model.normalize.std.flatten().tolist())


def _check_recorded_shape(path: str, checkpoint: Any, *, arch: str, num_classes: int, in_channels: int) -> None:
    """Checkpoints that say what they hold (ours, our export, RST's num_classes) are checked up front,
    so the message names the real difference instead of a list of keys."""
    if not isinstance(checkpoint, dict):
        return
    recorded = {"arch": checkpoint.get("arch"), "num_classes": checkpoint.get("num_classes"),
                "in_channels": checkpoint.get("in_channels")}
    wanted = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels}
    differs = [key for key, value in recorded.items()
               if isinstance(value, (str, int)) and not isinstance(value, bool) and value != wanted[key]]
    if differs:
        has = ", ".join(f"{k}={recorded[k]!r}" for k in differs)
        needs = ", ".join(f"{k}={wanted[k]!r}" for k in differs)
        raise UserError(f"Checkpoint {path} holds a model with {has}, but this run needs {needs}. Set "
                        "teacher.arch to the checkpoint's architecture, or use a checkpoint trained on this "
                        "dataset (the class count and the input channels come from the dataset).")


def _network_weights(path: str, checkpoint: Any) -> OrderedDict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint, wrapper prefixes and unused blocks removed."""
    weights = checkpoint
    if isinstance(checkpoint, dict):
        for entry in _STATE_DICT_ENTRIES:
            if isinstance(checkpoint.get(entry), dict):
                weights = checkpoint[entry]
                break
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        shown = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"Checkpoint {path} holds no state dict (its top level is {shown}); expected a "
                        "dict of parameter tensors, bare or under 'state_dict' or 'model_state_dict'. "
                        "Re-save it with torch.save(model.state_dict(), 'weights.pt').")
    cleaned = OrderedDict()
    for key, value in weights.items():
        key = strip_prefixes(key)
        if not any(strip_prefixes(key, ("net.", "model.", "1.")).startswith(p) for p in _UNUSED_PREFIXES):
            cleaned[key] = value
    return cleaned


def _split_normalizer(weights: OrderedDict[str, torch.Tensor]):
    """(network weights without any prefix, (mean, std) when the checkpoint has a normaliser layer)."""
    for norm_prefix, net_prefix in _NORMALIZED_LAYOUTS:
        stats_keys = (norm_prefix + "mean", norm_prefix + "std")
        rest = [k for k in weights if k not in stats_keys]
        if all(k in weights for k in stats_keys) and rest and all(k.startswith(net_prefix) for k in rest):
            stats = tuple(weights[k].detach().flatten().double().tolist() for k in stats_keys)
            return OrderedDict((k[len(net_prefix):], weights[k]) for k in rest), stats
    for net_prefix in _NET_PREFIXES:
        if all(k.startswith(net_prefix) for k in weights):
            return OrderedDict((k[len(net_prefix):], v) for k, v in weights.items()), None
    return weights, None


def _recorded_entries(path: str, checkpoint: Any) -> tuple[list[float], list[float]] | None:
    if not isinstance(checkpoint, dict):
        return None
    if isinstance(checkpoint.get("normalization"), dict):  # our export
        entry = checkpoint["normalization"]
        return _stats_pair(path, entry.get("mean"), entry.get("std"), "its normalization entry")
    if "mean" in checkpoint and "std" in checkpoint:  # our model.pt
        return _stats_pair(path, checkpoint["mean"], checkpoint["std"], "its mean/std entries")
    return None


def _stats_pair(path: str, mean: Any, std: Any, where: str) -> tuple[list[float], list[float]]:
    try:
        pair = ([float(v) for v in mean], [float(v) for v in std])
    except (TypeError, ValueError) as e:
        raise UserError(f"Checkpoint {path} has an unreadable normalisation in {where} (mean {mean!r}, "
                        f"std {std!r}); expected two lists of numbers, one per input channel.") from e
    _check_std(pair, f"checkpoint {path}'s {where}")
    return pair


def _check_std(pair: tuple[list[float], list[float]], what: str) -> None:
    if len(pair[0]) != len(pair[1]) or any(s <= 0 for s in pair[1]):
        raise UserError(f"The input normalisation of {what} (mean {pair[0]}, std {pair[1]}) needs as many "
                        "means as stds, one per input channel, and every std positive.")


def _given_normalization(path: str, input_normalization, mean, std) -> tuple[list[float], list[float]] | None:
    if (mean is None) != (std is None):
        raise UserError(f"Importing {path}: give both mean and std of the input normalisation, or neither.")
    if mean is not None and input_normalization is not None:
        raise UserError(f"Importing {path}: the input normalisation is given twice (input_normalization and "
                        "mean/std); give one of them.")
    if mean is not None:
        input_normalization = (mean, std)
    # The config's list form: [] for [0, 1] inputs, ["cifar10"] for a dataset's statistics.
    if isinstance(input_normalization, (list, tuple)) and len(input_normalization) <= 1:
        input_normalization = input_normalization[0] if input_normalization else None
    if input_normalization is None or input_normalization == "none":
        return None
    if isinstance(input_normalization, str):
        if input_normalization not in DATASET_STATS:
            raise UserError(f"Unknown input normalisation {input_normalization!r} for checkpoint {path}; use "
                            f"one of {sorted(DATASET_STATS)}, 'none' for [0, 1] inputs, or a [mean, std] pair "
                            "of per-channel lists such as [[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]].")
        pair = DATASET_STATS[input_normalization]
        return [float(v) for v in pair[0]], [float(v) for v in pair[1]]
    try:
        given_mean, given_std = input_normalization
        pair = ([float(v) for v in given_mean], [float(v) for v in given_std])
    except (TypeError, ValueError) as e:
        raise UserError(f"The input normalisation {input_normalization!r} for checkpoint {path} is neither a "
                        "dataset name nor a [mean, std] pair of per-channel lists, e.g. "
                        "[[0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]].") from e
    _check_std(pair, f"the input normalisation given for {path}")
    return pair


def _agree(path: str, recorded, given):
    if recorded is None or given is None:
        return recorded or given
    close = all(len(r) == len(g) and all(abs(a - b) <= _STATS_TOLERANCE for a, b in zip(r, g))
                for r, g in zip(recorded, given))
    if not close:
        raise UserError(f"Checkpoint {path} carries its own input normalisation (mean {recorded[0]}, std "
                        f"{recorded[1]}) but another one was given (mean {given[0]}, std {given[1]}). Leave "
                        "the input normalisation unset: the checkpoint's own layer is used.")
    return recorded


def _load_strict(path: str, net: nn.Module, weights: dict, *, arch: str, num_classes: int) -> None:
    expected = net.state_dict()
    # BatchNorm's step counter, absent from checkpoints of torch < 0.4.1, does not affect eval outputs.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in weights:
            weights[key] = value
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} {tuple(weights[k].shape)} in the file, {tuple(v.shape)} in {arch}"
              for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
                problems.append(f"{what}: {', '.join(keys[:_SHOWN_KEYS])}{more}")
        raise UserError(f"Checkpoint {path} does not fit architecture {arch!r} with {num_classes} classes "
                        f"({'; '.join(problems)}). Set teacher.arch to the architecture the checkpoint was "
                        "trained as, and check that it was trained on this dataset (class count, channels).")
    net.load_state_dict(weights, strict=True)


# -- export -----------------------------------------------------------------------------------------

def export_checkpoint(model_pt: str | os.PathLike, out: str | os.PathLike, *, format: str = "robustbench") -> str:
    """Write `model_pt` (our model.pt) as a RobustBench checkpoint at `out`; returns the note to print."""
    if format not in EXPORT_FORMATS:
        raise UserError(f"Unknown export format {format!r}; the formats are {', '.join(EXPORT_FORMATS)}.")
    model_pt = os.fspath(model_pt)
    _check_exportable_file(model_pt)
    checkpoint = read_checkpoint(model_pt)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("arch"), str):
        raise UserError(f"{model_pt} is not an rst-mart model.pt (no 'arch' entry); export takes the model.pt "
                        "of a finished stage, e.g. runs/<name>/mart/model.pt.")
    arch, in_channels = checkpoint["arch"], checkpoint.get("in_channels")
    if arch not in _ROBUSTBENCH_ARCHS:
        raise UserError(f"{model_pt} is a {arch}, which has no RobustBench counterpart; exportable "
                        f"architectures are {', '.join(_ROBUSTBENCH_ARCHS)}. The model.pt itself loads with "
                        "pipeline.load_model and takes [0, 1] inputs.")
    if in_channels != 3:
        raise UserError(f"{model_pt} takes {in_channels} input channel(s); RobustBench's architectures take "
                        "3 (RGB). Only RGB models can be exported to RobustBench.")
    model = load_model(model_pt)
    num_classes = int(checkpoint["num_classes"])
    module, constructor = _ROBUSTBENCH_ARCHS[arch]
    robustbench_model = f"{_ROBUSTBENCH_MODULE}.{module}.{constructor.format(k=num_classes)}"
    mean, std = normalization_stats(model)
    note = export_note(robustbench_model, mean, std)
    atomic_torch_save({
        "state_dict": OrderedDict((k, v.detach().clone()) for k, v in model.net.state_dict().items()),
        "normalization": {"mean": mean, "std": std},
        "robustbench_model": robustbench_model,
        "arch": arch,
        "num_classes": num_classes,
        "in_channels": 3,
        "note": note,
    }, out)
    return note


def _check_exportable_file(model_pt: str) -> None:
    """Refuse, before torch opens it, a model.pt that is not a regular file (a FIFO would block the
    reader, a link to /dev/zero would never end) or is larger than any model.pt: torch.load reads it all."""
    try:
        fd, st = open_regular(model_pt)
    except NotRegularFile as e:
        raise UserError(f"{model_pt} is {e.kind}, not a regular file; export takes the model.pt of a finished "
                        "stage, e.g. runs/<name>/mart/model.pt.") from None
    except OSError:
        return  # missing or unreadable: read_checkpoint says so, with the fix
    os.close(fd)
    if st.st_size > EXPORT_LIMIT_BYTES:
        raise UserError(f"{model_pt} holds {st.st_size} bytes, over the {EXPORT_LIMIT_BYTES >> 30} GiB a model.pt "
                        "can reach (a WRN-70-16 is about 1.1 GiB): not a model.pt written by a stage; check the "
                        "path.")


def export_note(robustbench_model: str, mean: Sequence[float], std: Sequence[float]) -> str:
    """What a RobustBench user must know to get this model's logits from the exported weights."""
    load = f"checkpoint['state_dict'] loads strictly into {robustbench_model}"
    if all(m == 0.0 for m in mean) and all(s == 1.0 for s in std):
        return f"{load}, which takes [0, 1] inputs as this model does; no normalisation is needed."
    return (f"{load}. That network expects normalised inputs: this model feeds it (x - mean) / std of its "
            f"[0, 1] input with mean {list(mean)} and std {list(std)} (also in checkpoint['normalization']). "
            "For RobustBench's [0, 1] convention wrap it: model = normalize_model(net, mean, std) from "
            f"{_ROBUSTBENCH_MODULE}.utils_architectures, after net.load_state_dict(checkpoint['state_dict']).")
