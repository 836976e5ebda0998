"""What every evaluation protocol works with: the context (encoder, labelled data, device, loaded once),
frozen features, predictions and accuracy, and the supervised training loop.

Every protocol scores `cfg.val_split` with top-1 / top-5 accuracy. The supervised ones (linear
probe, attentive probe, fine-tuning) train through the shared loop (`mimkit.train.loop.fit`), so
they get the same logging, AMP, checkpoints and exact resume as pretraining, plus a validation at
the end of every epoch that keeps the best checkpoint beside the latest ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import IterableDataset

from mimkit.architecture import encoder_of, with_img_size
from mimkit.config import DataConfig, to_dict
from mimkit.convert import load
from mimkit.data import EvalTransform, PretrainAugment, dataset_of
from mimkit.eval.config import EvalConfig
from mimkit.eval.features import FeatureSet, extract, features, in_shares
from mimkit.models.vit import VisionTransformer
from mimkit.serialization import read_torch
from mimkit.train.checkpoint import write_atomic
from mimkit.train.dist import full_state_dict, is_main, pick_device
from mimkit.train.loop import StepInfo, fit


@dataclass
class Context:
    """What every protocol starts from."""

    cfg: EvalConfig
    encoder: VisionTransformer
    """The pretrained encoder alone (no decoder), at the evaluation resolution, on the device."""
    train_set: object
    val_set: object
    num_classes: int
    transform: EvalTransform
    """(B, C, S, S') -> normalised (B, C, height, width) of the encoder: resize + center crop."""
    device: torch.device


def vit_from(model: nn.Module, img_size: int | None = None, **changes) -> VisionTransformer:
    """A new `VisionTransformer` with the encoder weights of `model` (an MAE/CAE model or a ViT): the
    encoder carved out (`encoder_of`), resized to `img_size` (`with_img_size`), rebuilt with `changes`
    to its constructor arguments (num_classes, global_pool, drop_path_rate). Its classifier is new; with
    global_pool "avg" the pretrained final `norm` is dropped and a fresh `fc_norm` is used (MAE fine-tuning)."""
    encoder = with_img_size(encoder_of(model), img_size or model.img_size)
    vit = VisionTransformer(**{**encoder.arch, **changes})
    own = vit.state_dict()
    state = {k: v for k, v in encoder.state_dict().items() if k in own and not k.startswith(("head.", "fc_norm."))}
    missing = vit.load_state_dict(state, strict=False).missing_keys
    unexpected_missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if unexpected_missing:
        raise ValueError(f"the checkpoint's encoder lacks {', '.join(unexpected_missing)}")
    return vit


def decoded_height(dataset) -> int:
    """Height of the images a dataset yields (its workers already resized them)."""
    samples = iter(dataset) if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    return next(s.image.shape[-2] for s in samples if s.image is not None)


def build_context(cfg: EvalConfig, model: nn.Module | None = None, device: torch.device | None = None) -> Context:
    """Encoder (from `cfg.checkpoint`, or the given `model`) and labelled data for a protocol, on
    `device` (default: `train.device`'s)."""
    if model is None and not cfg.checkpoint:
        raise FileNotFoundError("no checkpoint given: mimkit eval PROTOCOL CHECKPOINT --data ...")
    device = device or pick_device(cfg.train.device)
    model = model if model is not None else load(cfg.checkpoint)
    encoder = vit_from(model, cfg.img_size or None).to(device).eval()
    d = cfg.data
    train_set, val_set, transform = labelled_data(d, encoder.img_size, (d.split, cfg.val_split), (d.limit, 0),
                                                  cfg.crop_pct, channels=encoder.in_chans)
    return Context(cfg, encoder, train_set, val_set, len(train_set.classes), transform, device)


def labelled_data(d: DataConfig, size: tuple[int, int], splits: tuple[str, str], limits: tuple[int, int],
                  crop_pct: float = 0.0, strict: bool | None = None, channels: int = 3) -> tuple:
    """(training set, validation set, validation transform) of the data section `d` for inputs of `size`
    (height, width) and `channels`; `crop_pct` 0 center-crops what the data workers decoded (see
    `EvalConfig.crop_pct`)."""
    train_set = dataset_of(d, size, splits[0], limit=limits[0], strict=strict, channels=channels)
    val_set = dataset_of(d, size, splits[1], limit=limits[1], strict=strict, channels=channels)
    transform = EvalTransform(size, crop_pct=crop_pct or size[0] / decoded_height(val_set), mean=d.mean, std=d.std)
    return train_set, val_set, transform


def accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent: {"top1": .., "top5": ..} (k capped at the number of classes)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (M, kmax)
    hit = top == labels.unsqueeze(1)
    return {f"top{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def predict(forward: Callable[[Tensor], Tensor], dataset, transform, batch_size: int, device,
            empty: Tensor) -> dict[str, float]:
    """Top-1/top-5 of `forward` (normalised images or features -> logits) on a dataset, in eval mode.
    Under torchrun a collective: every process scores its share (`empty`: see `in_shares`)."""
    with torch.no_grad():
        scores, labels = in_shares(dataset, forward, batch_size=batch_size, empty=empty, transform=transform,
                                   device=device)
    return accuracy(scores, labels)


def train_classifier(ctx: Context, model: nn.Module, loss_fn, optimizer, kind: str, resume: str | None = None,
                     data: tuple | None = None) -> dict:
    """Fit `model` with the shared loop, validating it after every epoch; keeps `best.pt` (the trainable
    weights of the best epoch) beside the latest checkpoints. Returns last and best accuracies. `data` is
    (training set, validation set, validation transform): the context's images unless given (features)."""
    cfg = ctx.cfg
    train_set, val_set, val_transform = data or (ctx.train_set, ctx.val_set, ctx.transform)
    out_dir = Path(cfg.out_dir)
    best_path = out_dir / "best.pt"
    best = {"top1": -1.0}
    if resume is not None and best_path.exists():  # the best epoch of the run being resumed
        best = read_torch(best_path)["best"]

    empty = val_set.feats[:0] if isinstance(val_set, FeatureSet) else torch.zeros(0, ctx.encoder.in_chans,
                                                                                  *ctx.encoder.img_size)
    empty = empty.to(ctx.device)
    # A fine-tuned classifier's best.pt names its architecture, so that `mimkit.load` rebuilds it as it is.
    entry = {"config": to_dict(cfg)}
    if isinstance(model, VisionTransformer):
        entry = {"method": "vit", "config": {**entry["config"], "model": model.arch}}

    scored = {}  # step -> metrics, so that a validation at the last step is not run twice

    def validate(info: StepInfo) -> dict | None:
        if not (info.end_of_epoch and cfg.val_every and (info.epoch + 1) % cfg.val_every == 0):
            return None
        model.eval()
        metrics = scored[info.step] = predict(model, val_set, val_transform, cfg.train.batch_size, ctx.device, empty)
        model.train()
        if metrics["top1"] > best["top1"]:  # the same metrics, so the same decision, in every process
            best.clear()
            best.update(metrics, epoch=info.epoch + 1)
            state = full_state_dict(model)
            if is_main():
                out_dir.mkdir(parents=True, exist_ok=True)
                write_atomic(best_path, {"model": state, "best": dict(best), **entry})
        return {f"val_{k}": v for k, v in metrics.items()}

    summary = fit(model, loss_fn, train_set, optimizer, cfg.train, out_dir=out_dir, config=to_dict(cfg),
                  kind=kind, strict=cfg.data.strict, num_workers=cfg.data.num_workers, resume=resume,
                  hooks=[validate])
    model.eval()
    last = scored.get(summary["step"]) or predict(model, val_set, val_transform, cfg.train.batch_size, ctx.device,
                                                  empty)
    return {**last, "best": best if best["top1"] >= 0 else dict(last), "steps": summary["step"]}


def features_of(ctx: Context, pool: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Frozen features of the training and validation sets (the slow part of kNN and cached probes)."""
    n = ctx.cfg.data.num_workers
    bs = max(ctx.cfg.train.batch_size, 256)
    train = extract(ctx.encoder, ctx.train_set, ctx.transform, pool, bs, n)
    val = extract(ctx.encoder, ctx.val_set, ctx.transform, pool, bs, n)
    return (*train, *val)



class FrozenProbe(nn.Module):
    """A trainable head on a frozen encoder's features; only the head is saved and trained."""

    def __init__(self, encoder: VisionTransformer, head: nn.Module, pool: str):
        super().__init__()
        self.head, self.pool = head, pool
        self.encoder = [encoder]  # a list keeps it out of parameters() and state_dict()

    def forward(self, imgs: Tensor) -> Tensor:
        return self.head(features(self.encoder[0], imgs, self.pool))


def probe(ctx: Context, head: nn.Module, pool: str, optimizer: torch.optim.Optimizer, kind: str,
          resume: str | None = None, cached: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> dict:
    """Train `head` on frozen features (`pool`) with cross-entropy. With `probe.augment` images go through
    RandomResizedCrop + flip and the frozen encoder at every step (the papers' protocol); without, the
    features are computed once (or taken from `cached`: `features_of(ctx, pool)`) and the head trains on them."""
    cfg = ctx.cfg
    head.to(ctx.device)
    if cfg.probe.augment:
        d = cfg.data
        augment = PretrainAugment(ctx.encoder.img_size, scale=d.scale, ratio=d.ratio, hflip=d.hflip, mean=d.mean,
                                  std=d.std)
        model = FrozenProbe(ctx.encoder, head, pool)

        def loss_fn(module, batch, generator):
            logits = module(augment(batch["images"].to(ctx.device), generator))
            return F.cross_entropy(logits, batch["labels"].to(ctx.device)), {}

        return train_classifier(ctx, model, loss_fn, optimizer, kind, resume)
    feats, labels, val_feats, val_labels = cached if cached is not None else features_of(ctx, pool)

    def loss_fn(module, batch, generator):
        return F.cross_entropy(module(batch["images"].to(ctx.device)), batch["labels"].to(ctx.device)), {}

    return train_classifier(ctx, head, loss_fn, optimizer, kind, resume,
                            data=(FeatureSet(feats, labels), FeatureSet(val_feats, val_labels), None))
