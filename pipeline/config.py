"""Configuration: one dataclass per TOML section, every default commented with its unit.

A config file only needs the keys it changes; `--set section.key=value` overrides any key with a
value parsed and checked against the field's type. Unknown sections and keys are refused, except in
`[pool]`, whose extra keys belong to the pool provider (which refuses the ones it does not take).
After the overrides, `config_checks.validate` checks every value's range and the values against each other (and the
batch sizes against torchrun's world size), so a bad value fails before any stage runs, not hours in.
No torch here: `status` must stay quick.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config_checks import validate
from pipeline.core.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.toml"


@dataclass
class RunConfig:
    seed: int = 0  # seeds every random stream: data split, init, sampling, augmentation, attack starts
    device: str = "auto"  # auto | cpu | cuda ("auto" takes CUDA when present)
    precision: str = "fp32"  # fp32 | bf16 | fp16 | auto (bf16 where native, else fp32): training autocast only; evaluation is always fp32
    channels_last: bool = False  # NHWC memory format for convolutions (faster on GPUs, and with oneDNN on CPUs)
    compile: bool = False  # torch.compile the model (not the attack loop)
    num_workers: int = 2  # batches gathered ahead by a background thread, used on GPUs or where a CPU core is spare (data.mixed.prefetch_depth); 0 = none
    checkpoint_every_s: float = 60.0  # seconds between mid-epoch checkpoints (plus one at every epoch end); 0 = every step
    sync_bn: bool = False  # SyncBatchNorm across ranks under torchrun (GPU)
    store: str = ""  # the stage store; "" = $RST_MART_STORE, else .store beside the work dir (runs/.store)


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | package.module:function
    root: str = ""  # where local files live ("" = the dataset's usual places, e.g. Debian's package)
    download: bool = False  # fetch with torchvision when the files are missing (needs internet)
    num_labeled: int = 4000  # class-balanced labeled subset of the training split; 0 = all of it


@dataclass
class PoolConfig:
    provider: str = "labeled-remainder"  # built-in name, entry point in rst_mart.pools, or module:factory
    path: str | list = ""  # the pool's file (or folder), a glob of its parts ("pool/part-*.npz"), or a list of files read in order
    limit: int = 0  # use the first N pool images; 0 = all
    convert: list[str] = field(default_factory=list)  # explicit conversions, e.g. ["gray-to-rgb", "resize"]
    options: dict = field(default_factory=dict)  # any other [pool] key, passed to the provider


@dataclass
class TeacherConfig:
    arch: str = "small-cnn"  # see ml.models.ARCHS
    epochs: int = 10  # passes over the labeled set
    batch_size: int = 128  # images per optimizer step
    lr: float = 0.05  # SGD learning rate at the start of the schedule
    momentum: float = 0.9  # SGD momentum (Nesterov off, as in the reference recipes)
    weight_decay: float = 5e-4  # L2 penalty on all parameters
    schedule: str = "cosine"  # cosine | piecewise (needs milestones) | constant
    milestones: list[int] = field(default_factory=list)  # piecewise: lr x0.1 after each of these epochs (1..epochs-1)
    augment: bool = True  # random crop (padding 3 at 28px, 4 at 32px) and horizontal flip
    checkpoint: str = ""  # a classifier to import instead of training one (our model.pt, a state dict, RobustBench/MART/RST); "" = train
    input_normalization: list = field(default_factory=list)  # for an imported checkpoint without its own: [] = [0,1] inputs, ["cifar10"], or [[means], [stds]]


@dataclass
class PseudolabelConfig:
    batch_size: int = 512  # pool images per teacher forward
    dedup_test: bool = False  # drop pool images that nearly duplicate a test image (test leakage)
    dedup_threshold: float = 7.843  # L2 distance on [0,1] pixels below which an image is a duplicate (RST: 2000/255)
    save_logits: bool = False  # also store float16 teacher logits (N, K)


@dataclass
class MartConfig:
    loss: str = "mart"  # mart | trades | pgd-at
    arch: str = "small-cnn"  # see ml.models.ARCHS
    epochs: int = 10  # training epochs of epoch_size examples each
    epoch_size: int = 0  # examples per epoch (labeled and pool together); 0 = the number of labeled images, as RST
    batch_size: int = 128  # images per optimizer step (labeled and pool together)
    lr: float = 0.01  # SGD learning rate at the start of the schedule
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 3.5e-3  # L2 penalty (MART's ResNet-18 recipe)
    schedule: str = "cosine"  # cosine | piecewise (needs milestones) | constant
    milestones: list[int] = field(default_factory=list)  # piecewise: lr x0.1 after each of these epochs (1..epochs-1)
    beta: float = 6.0  # weight of the misclassification-aware KL term (TRADES: of the KL term)
    epsilon: float = 0.031  # L-inf radius of the training attack, on [0,1] pixels
    step_size: float = 0.007  # PGD step of the training attack
    steps: int = 10  # PGD steps of the training attack
    unsup_fraction: float = 0.5  # share of each batch drawn (with replacement) from the pseudo-labeled pool
    pool_in_memory: str = "auto"  # load the pool's images into RAM up to this many GiB (0 = read pseudolabels.h5 in chunks); auto = a quarter of the available RAM
    augment: bool = True  # random crop and horizontal flip on labeled and pool images alike
    ema_decay: float = 0.0  # weight EMA decay per step (e.g. 0.995); 0 = no EMA
    val_size: int = 0  # labeled images (fewer than there are) held out to pick the best epoch by PGD accuracy; 0 = keep the last
    eval_n: int = 0  # test images for the stage's final clean / PGD-20 evaluation; 0 = the whole test set
    eval_batch_size: int = 256  # images per evaluation batch
    # Recipe options of the frontier (README "Training recipe options"); the defaults are the papers' losses.
    label_smoothing: float = 0.0  # label smoothing of the labeled examples' cross-entropy targets, in [0, 1) (DM-AT: 0.1)
    pool_label_smoothing: float = 0.0  # the same for the pool's pseudo-labeled examples, in [0, 1)
    pool_cutmix: float = 0.0  # probability, per pool example, of a CutMix box from another pool example (Rebuffi et al.)
    pool_loss_weight: float = 1.0  # weight of each pool example's loss against a labeled one's 1 (RST's w); >= 0


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=lambda: ["mart"])  # mart (selected), mart-last, teacher, or a checkpoint file (imported as mart.arch)
    attacks: list[str] = field(default_factory=lambda: ["clean", "fgsm", "pgd20", "cw30", "autoattack"])  # pgdN, cwN too
    n: int = 1000  # the first n test images, in dataset order
    eps: float = 0.0  # L-inf radius on [0, 1] pixels; 0 = the training radius mart.epsilon
    sweep: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0])  # multiples of eps for the PGD-20 curve
    batch_size: int = 256  # images per evaluation batch
    checks: bool = True  # run the gradient-masking sanity checks into checks.csv


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pseudolabel: PseudolabelConfig = field(default_factory=PseudolabelConfig)
    mart: MartConfig = field(default_factory=MartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def section(self, name: str) -> dict[str, Any]:
        """A section as a plain dict (pool options merged in), e.g. for fingerprints and stage.json."""
        values = dataclasses.asdict(getattr(self, name))
        if name == "pool":
            values.update(values.pop("options"))
        return values


_SECTION_TYPES = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (defaults for what it omits), apply `section.key=value` overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    raw = _read_toml(path)
    config = Config()
    sources: dict[str, str] = {}  # "section.key" -> where its value came from, for error messages
    for section, values in raw.items():
        if section not in _SECTION_TYPES:
            raise UserError(f"config file {path} has an unknown section [{section}]; the sections are "
                            f"{', '.join(f'[{s}]' for s in _SECTION_TYPES)}.")
        if not isinstance(values, dict):
            raise UserError(f"config file {path}: `{section}` must be a [section] table, not a value.")
        for key, value in values.items():
            _assign(config, section, key, value, where=f"config file {path}")
            sources[f"{section}.{key}"] = f"config file {path}"
    for item in overrides:
        section, key, value = parse_override(item)
        _assign(config, section, key, value, where=f"--set {item}")
        sources[f"{section}.{key}"] = f"--set {item}"
    validate(config, sources=sources)
    return config


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")  # TOML is UTF-8 whatever the locale says
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing file with --config "
                        f"(the shipped ones are in {CONFIG_DIR}).") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory; pass the path of a .toml file with --config "
                        f"(the shipped ones are in {CONFIG_DIR}).") from None
    except PermissionError:
        raise UserError(f"config file {path} cannot be read (permission denied); make it readable "
                        f"(chmod u+r {path}) or pass a copy you can read with --config.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                        f"{e.start}); TOML files must be UTF-8: save it as UTF-8 (for example "
                        f"iconv -f latin1 -t utf-8 {path} > fixed.toml) and pass that file.") from None
    except OSError as e:
        raise UserError(f"config file {path} cannot be read ({e.strerror or e}); pass a readable file "
                        "with --config.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML ({e}); fix the syntax at that line.") from None


def parse_override(item: str) -> tuple[str, str, Any]:
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise UserError(f"--set {item!r} is not of the form section.key=value (for example --set mart.beta=3).")
    return section, key.strip(), _parse_value(text)


def _parse_value(text: str) -> Any:
    """TOML syntax gives numbers, booleans and lists; anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _assign(config: Config, section: str, key: str, value: Any, where: str) -> None:
    if section not in _SECTION_TYPES:
        raise UserError(f"{where}: unknown section `{section}`; the sections are {', '.join(_SECTION_TYPES)}.")
    target = getattr(config, section)
    hints = typing.get_type_hints(type(target))
    if section == "pool" and key not in hints:
        target.options[key] = value  # the provider validates its own keys when the pool is opened
        return
    if section == "pool" and key == "path":  # one path, a glob, or a list of parts
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
            target.path = value
            return
        raise UserError(f"{where}: `pool.path` must be a path, a glob or a list of paths, got {value!r}; for "
                        f"example pool.path = [\"part-0.npz\", \"part-1.npz\"] or \"pool/part-*.npz\".")
    if key not in hints or key == "options":
        known = ", ".join(k for k in hints if k != "options")
        raise UserError(f"{where}: unknown key `{section}.{key}`; the keys of [{section}] are {known}.")
    setattr(target, key, _coerce(value, hints[key], f"{section}.{key}", where))


def _coerce(value: Any, kind: Any, name: str, where: str) -> Any:
    origin = typing.get_origin(kind) or kind
    if origin is list and not typing.get_args(kind):  # a free-form list, checked by the code that reads it
        if isinstance(value, str):
            return [_parse_value(v.strip()) for v in value.split(",") if v.strip()]
        return value if isinstance(value, list) else [value]
    if origin is list:
        (element,) = typing.get_args(kind)
        if isinstance(value, str):  # --set eval.attacks=clean,pgd20 (each item parsed like a TOML value)
            value = [_parse_value(v.strip()) for v in value.split(",") if v.strip()]
        elif not isinstance(value, list):  # --set mart.milestones=75: a list of one
            value = [value]
        # A list of names takes strings only: [1, 2] for eval.attacks is a mistake, not "1" and "2".
        items = [_REFUSED if element is str and not isinstance(v, str) else _coerce_scalar(v, element)
                 for v in value]
        bad = [v for v, ok in zip(value, items) if ok is _REFUSED]
        if bad:
            raise UserError(f"{where}: `{name}` must be a list of {element.__name__}, got {value!r} (the item "
                            f"{bad[0]!r} is {type(bad[0]).__name__}); write it as [a, b, ...] with "
                            f"{element.__name__} items, or a,b,... after --set.")
        return items
    coerced = _coerce_scalar(value, origin)
    if coerced is _REFUSED:
        raise UserError(f"{where}: `{name}` must be {origin.__name__}, got {value!r} ({type(value).__name__}).")
    return coerced


_REFUSED = object()


def _coerce_scalar(value: Any, kind: type) -> Any:
    """`value` as `kind` when it unambiguously is one (an int for a float, "true" for a bool), else _REFUSED."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif isinstance(value, bool):
        return _REFUSED
    elif kind is int:
        if isinstance(value, int):
            return value
    elif kind is float:
        if isinstance(value, (int, float)):
            return float(value)
    elif kind is str:
        if isinstance(value, (str, int, float)):
            return str(value)
    return _REFUSED
