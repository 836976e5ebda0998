"""Typed configuration: dataclasses with the papers' defaults, YAML recipes, dotted overrides.

A recipe holds only what differs from the defaults below. Unknown keys and wrong types fail with a
one-line `ConfigError` naming the dotted key (and the closest valid key for a misspelling). The
`model` section is a plain dict here and is checked against the chosen method's dataclass by
`mimkit.models.resolve_model_config` with the same rules, so this module imports nothing of mimkit.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The ImageNet normalisation (torchvision's), the default of every data pipeline.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def size_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) of a size given as one int (a square) or as [height, width]."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def check_size(key: str, size) -> tuple[int, int]:
    """`size_pair(size)`, every side at least 1."""
    h, w = size_pair(size)
    if min(h, w) < 1:
        raise ConfigError(f"{key}: every side must be >= 1, got {size if isinstance(size, int) else list(size)}")
    return h, w


class ConfigError(ValueError):
    """A bad configuration value or key; the message is one line and names the dotted key."""


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    """`cifar10`, `folder` (class sub-folders of images or `.npy` arrays, read with `model.in_chans` channels),
    `shards` (WebDataset tar shards written by `mimkit data shard`, streamed) or `hf` (a Hugging Face `datasets`
    dataset)."""
    root: str = "builtin"
    """cifar10: `builtin` (the subset shipped with mimkit), `download`, a folder or a .tar.gz; folder: a directory;
    shards: their folder, or a brace/glob pattern such as `/disk{1,2}/in1k/shard-{000000..000127}.tar`; hf: a
    `save_to_disk` folder, a folder of parquet/arrow files, or a Hub dataset id."""
    split: str = "train"
    """`train` or `test`; a folder dataset uses `root/split` when it exists, else `root`."""
    load_size: int | tuple[int, int] = 0
    """Folders and shards, for evaluation and pictures: workers resize the image to cover this and center-crop
    it ([height, width]; one int: the shorter side, the longer one in the model's aspect ratio);
    0 = img_size * 256 / 224 (pretraining crops come from the original image)."""
    scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range (MAE: 0.2-1.0; CAE: 0.08-1.0)."""
    ratio: tuple[float, float] = (0.75, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    hflip: bool = True
    """Random horizontal flip with probability 0.5."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    """Normalisation mean per channel (ImageNet's RGB; one value per `model.in_chans`, on the 0-1 scale of the
    file's type: `mimkit data stats` computes them)."""
    std: tuple[float, ...] = IMAGENET_STD
    """Normalisation std per channel (ImageNet's RGB)."""
    rgb_bands: tuple[int, ...] = ()
    """Pictures of data that is not RGB: the three channels shown as R, G, B (default: the first three; one
    channel is shown as grey)."""
    num_workers: int = 2
    """DataLoader worker processes that decode files (0 = decode in the main process)."""
    strict: bool = False
    """Stop at the first unreadable file instead of skipping, counting and reporting it."""
    cache_dir: str = "~/.cache/mimkit"
    """Where downloads, extracted archives and decoded CIFAR arrays are kept."""
    limit: int = 0
    """Use only N samples spread evenly over the dataset (0 = all), for quick runs."""
    shuffle_buffer: int = 1000
    """Shards and hf streams: samples read into memory and shuffled together (after the shard order is shuffled
    per epoch)."""
    max_member_bytes: int = 1 << 26
    """Shards: a member larger than this many bytes (default 64 MiB) is skipped as unreadable, never read."""
    image_column: str = "image"
    """hf: the column holding the images (an Image feature, bytes or paths)."""
    label_column: str = "label"
    """hf: the column holding the labels (a ClassLabel names the classes); absent: every label is 0."""
    streaming: bool = False
    """hf: read the split as a stream (`datasets` streaming: parquet and arrow files as they are, with no arrow
    cache built; a Hub id straight from the Hub) instead of memory-mapping it; shuffled in `shuffle_buffer`
    rows, resumed exactly. The label column must then be a ClassLabel (or absent)."""

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.dataset, ("cifar10", "folder", "shards", "hf"))
        for name in ("shuffle_buffer", "max_member_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}: must be >= 1, got {getattr(self, name)!r}")
        check_choice("data.split", self.split, ("train", "test"))
        if self.streaming and self.dataset != "hf":
            raise ConfigError(f"data.streaming: only for data.dataset=hf (shards always stream), got {self.dataset}")
        check_range("data.scale", self.scale, 0.0, 1.0)
        if self.scale[1] <= 0:
            raise ConfigError(f"data.scale: max must be > 0, got {list(self.scale)}")
        check_range("data.ratio", self.ratio, 0.0, math.inf)
        check_positive("data.ratio", self.ratio[0])
        for name, values in (("mean", self.mean), ("std", self.std)):
            if not all(math.isfinite(v) for v in values):
                raise ConfigError(f"data.{name}: must be finite, got {list(values)}")
        if not all(v > 0 for v in self.std):
            raise ConfigError(f"data.std: every value must be > 0, got {list(self.std)}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError(f"data.mean and data.std: one value per channel each, got {len(self.mean)} and "
                              f"{len(self.std)}")
        if self.load_size != 0:  # 0: automatic
            check_size("data.load_size", self.load_size)
        if self.rgb_bands and (len(self.rgb_bands) != 3 or min(self.rgb_bands) < 0):
            raise ConfigError(f"data.rgb_bands: three channel indices (R, G, B), got {list(self.rgb_bands)}")
        check_nonneg("data.limit", self.limit)
        check_nonneg("data.num_workers", self.num_workers)


@dataclass
class TrainConfig:
    epochs: int = 800
    """Number of passes over the data (MAE: 800 or 1600)."""
    batch_size: int = 64
    """Images per device per forward pass (micro-batch)."""
    accum_steps: int = 1
    """Micro-batches accumulated per optimizer step; effective batch = batch_size * accum_steps * world size."""
    blr: float = 1.5e-4
    """Base learning rate; lr = blr * effective batch / 256 (MAE)."""
    lr: float = 0.0
    """Absolute learning rate; overrides blr when > 0."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    warmup_epochs: float = 40.0
    """Linear warmup length in epochs, applied per iteration (MAE: 40)."""
    weight_decay: float = 0.05
    """AdamW weight decay; never applied to norms, biases, position embeddings and tokens."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (MAE: 0.9, 0.95)."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value (0 = off; CAE: 3.0)."""
    precision: str = "auto"
    """`auto` (bf16 on a CUDA GPU that has it, fp32 elsewhere), `fp32`, `bf16` (autocast) or `fp16` (autocast
    with a gradient scaler)."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."""
    seed: int = 0
    """Seeds weights, data order, augmentation and masks; a CPU run is bit-for-bit repeatable."""
    schedule_steps: int = 0
    """Length of the run and of its learning-rate schedule in optimizer steps, instead of `epochs` (0 = epochs x
    steps per epoch): budgets that are not whole epochs. Warmup is still counted in epochs."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs); the schedule still spans all epochs."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint) after this much wall-clock time in this process (0 = no limit); the
    schedule still spans all epochs, so set `epochs` to what the budget allows."""
    log_every: int = 10
    """Optimizer steps between log lines (and non-finite-loss checks)."""
    trackers: tuple[str, ...] = ()
    """Experiment trackers besides metrics.jsonl: any of `tensorboard`, `wandb`, `mlflow` (each an extra): [wandb]."""
    ckpt_every: int = 0
    """Optimizer steps between checkpoints (0 = only at the end of each epoch and of the run)."""
    keep_last: int = 3
    """How many checkpoints to keep."""
    vis_images: int = 4
    """Images in the reconstruction picture written at each checkpoint (0 = none)."""
    strategy: str = "ddp"
    """With several processes (torchrun): `ddp` (a full copy per process) or `fsdp` (FSDP2: weights, gradients
    and optimizer state sharded per block; sharded checkpoints); ignored by a single process."""
    compile: bool = False
    """`torch.compile` each transformer block (the first steps are slow while it compiles)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them: less memory, ~1/3 more compute."""
    keep_memory: bool = True
    """On the CPU, reuse the memory a step frees in the next step instead of returning it to the OS and
    faulting it back in (glibc malloc settings, see `mimkit.train.malloc`); the process keeps its peak size."""

    def __post_init__(self) -> None:
        check_choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        check_choice("train.strategy", self.strategy, ("ddp", "fsdp"))
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise ConfigError("train.strategy=fsdp: use precision bf16 or fp32 (the fp16 gradient scaler does "
                              "not handle sharded gradients)")
        for name in ("epochs", "batch_size", "accum_steps", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)!r}")
        for name in ("blr", "lr", "min_lr", "warmup_epochs", "weight_decay", "clip_grad", "schedule_steps",
                     "max_steps", "max_minutes",
                     "ckpt_every", "vis_images"):
            check_nonneg(f"train.{name}", getattr(self, name))
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas: each must be in [0, 1), got {list(self.betas)}")
        for name in self.trackers:
            check_choice("train.trackers", name, ("tensorboard", "wandb", "mlflow"))
            if importlib.util.find_spec(name) is None:
                raise ConfigError(f"train.trackers: {name} is not installed: pip install 'mimkit[{name}]'")
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"train.trackers: each at most once, got {list(self.trackers)}")
        if not (self.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise ConfigError(f"train.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass
class KNNConfig:
    """The kNN classifier's settings, shared by the online monitor (`monitor.*`) and `mimkit eval knn`
    (`probe.*`)."""

    pool: str = "cls"
    """Frozen features: `cls` token or `mean` of the patch tokens (kNN and the linear probe)."""
    k: int = 20
    """kNN: neighbours that vote (DINO / lightly: 20)."""
    temperature: float = 0.07
    """kNN: votes are weighted by exp(cosine similarity / temperature)."""

    def check_knn(self, section: str) -> None:
        check_choice(f"{section}.pool", self.pool, ("cls", "mean"))
        if self.k < 1:
            raise ConfigError(f"{section}.k: must be >= 1, got {self.k!r}")
        check_positive(f"{section}.temperature", self.temperature)


@dataclass
class MonitorConfig(KNNConfig):
    every_epochs: int = 0
    """Online kNN evaluation every this many epochs of pretraining (0 = off), logged as knn_top1/top5."""
    bank_size: int = 5000
    """Labelled training images (spread over the train split) that form the kNN bank."""
    query_size: int = 1000
    """Test-split images that are classified."""

    def __post_init__(self) -> None:
        self.check_knn("monitor")
        check_nonneg("monitor.every_epochs", self.every_epochs)
        for name in ("bank_size", "query_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"monitor.{name}: must be >= 1, got {getattr(self, name)!r}")


@dataclass
class Config:
    method: str = "mae"
    """Pretraining method: a key of `mimkit.models.METHODS` (`mae`, `cae`, `simmim`, `ijepa`, `data2vec2`)."""
    model: dict = field(default_factory=dict)
    """Model section, checked against the method's config class (`preset` plus any field of it)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data and augmentation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, schedule, precision, logging and checkpoints."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """Optional online kNN evaluation while pretraining."""
    out_dir: str = "runs/pretrain"
    """Where checkpoints, logs, pictures and the resolved config are written."""
    init: str = ""
    """Weights to start from (any file or folder `mimkit.load` reads: official MAE/CAE, Hugging Face, timm, mimkit);
    what they lack keeps the method's initialisation; a new optimizer and schedule start. Empty: from scratch."""


# --------------------------------------------------------------------------- validation helpers


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def check_nonneg(key: str, value: float) -> None:
    if not value >= 0 or value == math.inf:  # NaN fails every comparison
        raise ConfigError(f"{key}: must be a finite number >= 0, got {value!r}")


def check_positive(key: str, value: float) -> None:
    if not 0 < value < math.inf:
        raise ConfigError(f"{key}: must be a finite number > 0, got {value!r}")


def check_open_unit(key: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{key}: must be in (0, 1), got {value!r}")


def check_divides(key: str, value: int, of_key: str, of: int) -> None:
    if of % value:
        raise ConfigError(f"{key}: {value} does not divide {of_key}={of}")


def check_range(key: str, pair: tuple[float, float], lo: float, hi: float) -> None:
    if not (lo <= pair[0] <= pair[1] <= hi):
        raise ConfigError(f"{key}: expected {lo} <= min <= max <= {hi}, got {list(pair)}")


def check_device(key: str, device: str) -> None:
    """`auto`, `cpu`, `cuda` or `cuda:N`, available on this machine."""
    if device in ("auto", "cpu"):
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ConfigError(f"{key}: {device!r} is not one of auto, cpu, cuda, cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{key}: {device!r} is not available here (torch.cuda.is_available() is False); "
                          "use cpu or auto")
    if match[1] is not None and int(match[1]) >= torch.cuda.device_count():
        raise ConfigError(f"{key}: {device!r} is not available here ({torch.cuda.device_count()} CUDA device(s))")


def check_out_dir(key: str, out_dir: str) -> None:
    """A directory mimkit can create and write in (it need not exist yet)."""
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {out_dir} exists and is not a directory")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write in {out_dir} ({existing} is not a writable directory)")


def _unknown_key(key: str, valid: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{prefix}{key}: unknown key{hint}")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; int is accepted for float and lists for tuples."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {list(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], key)
        for option in options:  # int | tuple[int, int]: the first that takes the value
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        names = " or ".join("a list" if typing.get_origin(a) is tuple else a.__name__ for a in options)
        raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML reads `1e-4` (no dot) as a string: YAML 1.1
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a numeric folder name given on the command line
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(str(key), names, prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a __post_init__ comparing a wrong type
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict of YAML-safe values (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item}: an override must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last silently: a second `train:` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, it is not a key
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(f"key {key!r} appears twice (lines {seen[key]} and {line})")
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    pass
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def check_run(cfg) -> None:
    """What depends on this machine, checked before anything is built: `train.device` is available
    and `out_dir` is (or can be made) a writable directory (a `Config` or an `EvalConfig`)."""
    check_device("train.device", cfg.train.device)
    check_out_dir("out_dir", cfg.out_dir)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe (or start from the defaults), apply dotted overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(Config, apply_overrides(data, list(overrides)))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` and of its dataclass bases, in field
    order (for --help and the README)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs
