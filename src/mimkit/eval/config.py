"""Evaluation configuration: the protocols' settings (`EvalConfig`), the papers' recipes per protocol
(`PROTOCOL_DEFAULTS`) and `load_eval_config`; built with the rules of `mimkit.config`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from mimkit.config import (
    ConfigError,
    DataConfig,
    KNNConfig,
    TrainConfig,
    apply_overrides,
    check_choice,
    check_nonneg,
    check_size,
    from_dict,
    read_yaml,
)


@dataclass
class ProbeConfig(KNNConfig):
    chunk_size: int = 1024
    """kNN: test images compared with the whole bank at once (bounds memory: chunk x bank floats)."""
    augment: bool = True
    """Linear / attentive probe: train through the frozen encoder with RandomResizedCrop + flip, as the
    papers do; false trains on features computed once (much faster on a CPU)."""
    num_heads: int = 0
    """Attentive probe: heads of its cross-attention (0 = the encoder's)."""
    optimizer: str = "lars"
    """Probe optimizer: `lars` (MAE linear probing) or `sgd` with momentum 0.9 (CAE attentive probing)."""

    def __post_init__(self) -> None:
        self.check_knn("probe")
        check_choice("probe.optimizer", self.optimizer, ("lars", "sgd"))
        if self.chunk_size < 1:
            raise ConfigError(f"probe.chunk_size: must be >= 1, got {self.chunk_size!r}")
        check_nonneg("probe.num_heads", self.num_heads)


@dataclass
class FinetuneConfig:
    layer_decay: float = 0.75
    """Layer-wise lr decay (MAE: 0.65 for ViT-B, 0.75 for ViT-L/H)."""
    drop_path: float = 0.1
    """Stochastic depth rate (MAE: 0.1 for ViT-B, 0.2 for ViT-L)."""
    global_pool: str = "avg"
    """`avg` (mean of patch tokens, then `fc_norm`: MAE) or `token` (cls token after `norm`)."""
    smoothing: float = 0.1
    """Label smoothing."""
    mixup: float = 0.8
    """Mixup Beta(alpha, alpha) parameter (0 = off)."""
    cutmix: float = 1.0
    """CutMix Beta(alpha, alpha) parameter (0 = off)."""
    mix_prob: float = 1.0
    """Probability of mixing a batch at all."""
    switch_prob: float = 0.5
    """With both on, probability of CutMix instead of mixup for a batch."""
    randaug_n: int = 2
    """RandAugment: operations per image (0 = off)."""
    randaug_m: int = 9
    """RandAugment: magnitude on the 0-30 scale of timm and kornia (MAE: rand-m9)."""
    reprob: float = 0.25
    """Random erasing probability."""
    scratch: bool = False
    """Start from random weights (MAE initialisation) instead of the checkpoint: the from-scratch baseline."""

    def __post_init__(self) -> None:
        check_choice("finetune.global_pool", self.global_pool, ("avg", "token"))
        for name in ("layer_decay", "mix_prob", "switch_prob", "reprob", "smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"finetune.{name}: must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"finetune.drop_path: must be in [0, 1), got {self.drop_path!r}")
        for name in ("mixup", "cutmix", "randaug_n"):
            check_nonneg(f"finetune.{name}", getattr(self, name))
        if not 0 <= self.randaug_m <= 30:
            raise ConfigError(f"finetune.randaug_m: must be in [0, 30], got {self.randaug_m!r}")


@dataclass
class EvalConfig:
    protocol: str = "knn"
    """`knn`, `linprobe`, `attnprobe` or `finetune`."""
    checkpoint: str = ""
    """The model to evaluate: a mimkit checkpoint (or any file `mimkit.load` reads)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(scale=(0.08, 1.0)))
    """Labelled data: `split` is the training split (the kNN bank, the probe's training set)."""
    val_split: str = "test"
    """Split that is scored."""
    val_every: int = 1
    """Supervised protocols: score `val_split` (and keep the best checkpoint) every N epochs; 0 = once, at the
    end (few labels make epochs short: scoring a whole split after each one would cost more than training)."""
    img_size: int | tuple[int, int] = 0
    """Evaluation resolution, one side or [height, width] (0 = the model's); position embeddings are
    interpolated when it differs."""
    crop_pct: float = 0.0
    """Validation images are resized to img_size / crop_pct and center-cropped; 0 = only center-crop
    what the data workers decoded (folders: load_size, i.e. 224 / 256 = 0.875; CIFAR: the whole image)."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """kNN and probe settings."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fine-tuning regularisation and augmentation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation of the probe or fine-tuning (protocol defaults: see `PROTOCOL_DEFAULTS`)."""
    out_dir: str = "runs/eval"
    """Where metrics.jsonl, results.json and the best and last checkpoints go."""

    def __post_init__(self) -> None:
        check_choice("protocol", self.protocol, tuple(PROTOCOL_DEFAULTS))
        check_choice("val_split", self.val_split, ("train", "test"))
        check_nonneg("val_every", self.val_every)
        if self.img_size != 0:  # 0: the model's
            check_size("img_size", self.img_size)
        if not 0.0 <= self.crop_pct <= 1.0:
            raise ConfigError(f"crop_pct: must be in [0, 1] (0 = off), got {self.crop_pct!r}")


# The papers' recipes (MAE appendix A.2 / A.1, CAE section 4); recipes under configs/eval override them.
PROTOCOL_DEFAULTS: dict[str, dict] = {
    "knn": {},
    "linprobe": {"train": {"epochs": 90, "batch_size": 256, "blr": 0.1, "warmup_epochs": 10, "weight_decay": 0.0,
                           "vis_images": 0, "log_every": 50}},
    "attnprobe": {"train": {"epochs": 90, "batch_size": 256, "blr": 0.1, "warmup_epochs": 10, "weight_decay": 0.0,
                            "vis_images": 0, "log_every": 50}},
    "finetune": {"train": {"epochs": 100, "batch_size": 64, "blr": 5e-4, "warmup_epochs": 5, "weight_decay": 0.05,
                           "betas": [0.9, 0.999], "vis_images": 0, "log_every": 50}},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_eval_config(protocol: str, path: str | Path | None = None, overrides: list[str] = (),
                     base: dict | None = None, given: dict | None = None) -> EvalConfig:
    """The protocol's paper defaults, then `base` (e.g. the checkpoint's data settings), then a YAML
    recipe, then `given` (values, e.g. the command line's checkpoint path: never parsed as YAML), then
    dotted overrides; validated."""
    if protocol not in PROTOCOL_DEFAULTS:
        raise ConfigError(f"protocol: {protocol!r} is not one of {', '.join(PROTOCOL_DEFAULTS)}")
    recipe = read_yaml(path) if path is not None else {}
    if recipe.get("protocol", protocol) != protocol:
        raise ConfigError(f"protocol: {path} is a {recipe['protocol']} recipe, not {protocol}")
    data = PROTOCOL_DEFAULTS[protocol]
    for layer in (base or {}, recipe, given or {}, {"protocol": protocol}):
        data = _merge(data, layer)
    # apply_overrides edits in place: on a copy, never on the sections PROTOCOL_DEFAULTS shares with it
    return from_dict(EvalConfig, apply_overrides(copy.deepcopy(data), list(overrides)))
