"""Does the data keep up? `mimkit pretrain` from a folder of ImageNet-sized JPEGs, end to end (each loader
worker decodes a file at the smallest sufficient DCT scale and crops it, the uint8 crops are uploaded from
pinned memory, flipped, normalised and trained on), against the same recipe's training step on a batch that
is already on the device: the synthetic-batch rate, what the model alone allows. Their ratio is the share of
the model's speed a real run gets; below 1 the input pipeline is the bottleneck.

The JPEGs are made here: `--images` photo-like pictures (smooth random colour fields with grain, long side
400-640 px, aspect 3:4 to 4:3, quality 90: about the size and decode cost of ImageNet's), written by
`--workers` processes. The end-to-end rate is the median images/s of the run's log windows after the first
(which holds the workers' start and the first batches); the run stops before its first epoch ends, so no
checkpoint falls inside a timed window.

    python benchmarks/end_to_end.py --device cuda --workers 16      # MAE ViT-B/16 recipe, precision auto (bf16)
    python benchmarks/end_to_end.py --quick                         # smoke test: CIFAR-tiny model, a few steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import machine, time_steps, write_report
from mimkit.config import load_config
from mimkit.data import PretrainAugment
from mimkit.metrics import read_metrics
from mimkit.models import METHODS, resolve_model_config
from mimkit.train.loop import _autocast, _optimizer_step, pretrain, resolve_precision
from mimkit.train.optim import build_adamw

ROOT = Path(__file__).parents[1]


def write_picture(args: tuple[Path, int]) -> int:
    """One photo-like JPEG (`root`/class{i % 8}/{i}.jpg); returns its size in bytes."""
    root, i = args
    rng = np.random.default_rng(i)
    long_side, aspect = int(rng.integers(400, 641)), float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    w, h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    field = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 8, (h, w, 3))
    path = root / f"class{i % 8}" / f"{i:07d}.jpg"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def write_pictures(root: Path, count: int, workers: int) -> float:
    """`count` JPEGs in 8 class folders under `root`; returns their mean size in KiB."""
    for c in range(8):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    with Pool(max(1, workers)) as pool:
        sizes = pool.map(write_picture, [(root, i) for i in range(count)], chunksize=64)
    return sum(sizes) / len(sizes) / 1024


def synthetic_rate(cfg, device: torch.device, steps: int) -> float:
    """Images/s of the recipe's training step (bf16 where `train.precision` says so, fused AdamW, clipping as
    the recipe) on one batch of uint8 crops already on the device, as the loop runs it."""
    model_cfg = resolve_model_config(cfg.method, cfg.model)
    torch.manual_seed(0)
    model = METHODS[cfg.method][1](model_cfg).to(device).train()
    t, d = cfg.train, cfg.data
    optimizer = build_adamw(model, 1e-4, t.weight_decay, t.betas, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    augment = PretrainAugment(model_cfg.img_size, mean=d.mean, std=d.std, crop=False)
    precision, g = resolve_precision(t.precision, device), torch.Generator().manual_seed(0)
    size = model.img_size
    images = torch.randint(0, 256, (t.batch_size, model_cfg.in_chans, *size), dtype=torch.uint8).to(device)

    def step() -> None:
        with _autocast(device, precision):
            loss = model(augment(images, g), generator=g).loss
        scaler.scale(loss).backward()
        _optimizer_step(model, optimizer, scaler, t.clip_grad, 1, 10)

    time_steps(step, 2, device)  # warm-up: kernels, allocator, optimizer state
    return t.batch_size / time_steps(step, steps, device)


def end_to_end_rate(cfg, out_dir: Path) -> dict:
    """`mimkit pretrain` with `cfg`; the median images/s of its log windows after the first."""
    pretrain(cfg)
    rates = [r["images_per_s"] for r in read_metrics(out_dir / "metrics.jsonl") if "images_per_s" in r]
    if len(rates) < 2:
        raise SystemExit(f"the run logged {len(rates)} window(s); raise --steps (or lower --log-every)")
    return {"images_per_s": statistics.median(rates[1:]), "windows": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/pretrain/mae_vit_base_in1k.yaml")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="loader workers (default: every core)")
    parser.add_argument("--batch", type=int, default=256, help="images per step")
    parser.add_argument("--steps", type=int, default=30, help="training steps of the end-to-end run")
    parser.add_argument("--log-every", type=int, default=5, help="steps per timed window")
    parser.add_argument("--images", type=int, default=0, help="JPEGs to write (default: enough for the run)")
    parser.add_argument("--dir", default=None, help="where the JPEGs and the run go (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/end_to_end.json")
    parser.add_argument("--quick", action="store_true", help="smoke test: CIFAR-tiny recipe at 32 px, CPU, few steps")
    args = parser.parse_args()
    if args.quick:
        args.recipe, args.device, args.workers, args.batch, args.steps, args.log_every = (
            "configs/pretrain/mae_vit_tiny_cifar10.yaml", "cpu", 1, 8, 6, 2)
    images = args.images or args.batch * (args.steps + 1)  # the run ends before its first epoch does
    if images < args.batch * (args.steps + 1):
        parser.error(f"--images {images}: at least --batch x (--steps + 1) = {args.batch * (args.steps + 1)}, so "
                     "that no epoch ends (and checkpoints) inside the timed run")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder, run_dir = Path(tmp) / "jpegs", Path(tmp) / "run"
        kib = write_pictures(folder, images, args.workers)
        print(f"wrote {images} JPEGs, {kib:.0f} KiB each on average")
        overrides = ["data.dataset=folder", f"data.root={folder}", f"data.num_workers={args.workers}",
                     f"train.batch_size={args.batch}", "train.accum_steps=1", f"train.max_steps={args.steps}",
                     f"train.log_every={args.log_every}", "train.vis_images=0", "train.warmup_epochs=0",
                     "train.ckpt_every=0", "train.keep_last=1", f"train.device={args.device}", f"out_dir={run_dir}"]
        if args.quick:
            overrides.append("data.mean=[0.5,0.5,0.5]")  # the CIFAR recipe's mean and std are CIFAR's; any will do
        cfg = load_config(ROOT / args.recipe, overrides)
        synthetic = synthetic_rate(cfg, device, max(3, args.log_every))
        e2e = end_to_end_rate(cfg, run_dir)
    ratio = e2e["images_per_s"] / synthetic
    report = {**machine(device), "recipe": args.recipe, "precision": resolve_precision(cfg.train.precision, device),
              "workers": args.workers, "batch": args.batch, "images": images, "mean_jpeg_kib": kib,
              "synthetic_images_per_s": synthetic, "end_to_end": e2e, "data_keeps_up_ratio": ratio}
    print(f"{'recipe':<40} {'workers':>7} {'synthetic img/s':>15} {'end-to-end img/s':>16} {'ratio':>6}")
    print(f"{args.recipe:<40} {args.workers:>7} {synthetic:>15.1f} {e2e['images_per_s']:>16.1f} {ratio:>6.2f}")
    write_report(report, Path(args.out))


if __name__ == "__main__":
    main()
