"""Images per second of the input pipeline alone (loader + batched augmentation), against the
training step it feeds: the pipeline must be faster, or the model waits.

Pipelines, each exactly what `mimkit pretrain` builds (`make_loader` + `PretrainAugment` on the
training device, uint8 batches from the workers):
  cifar    CIFAR-10 decoded in memory (the shipped subset, or --cifar ROOT), no workers, 32 px;
  folder   an image folder decoded by DataLoader workers (resize 256 + center crop, then
           RandomResizedCrop 224 + flip on the batch);
  shards   the same images as WebDataset tar shards (`mimkit data shard`), streamed.
The folder is --folder, or a synthetic one (random JPEGs of ImageNet's typical 500 x 375 px) written
to a temporary directory. Training steps (fp32 forward + backward + fused AdamW, mask 0.75) are timed
for the model each pipeline feeds: CIFAR-tiny at batch 128, ViT-B/16 at the --batch given. On a CPU
the loader workers and the training step share the cores; each is timed alone here.

    python benchmarks/data_loading.py                     # 512 synthetic images, 2 workers
    python benchmarks/data_loading.py --folder /datasets/imagenet/train --workers 8 --batches 50
    python benchmarks/data_loading.py --quick             # smoke test: 48 small images, a 2-block model
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from common import machine, write_report
from mimkit.data import PretrainAugment, ShardDataset, build_dataset, make_loader, set_epoch, write_shards
from mimkit.models import build_model


def synthetic_folder(root: Path, count: int, size: tuple[int, int]) -> Path:
    """`count` random-noise JPEGs in 4 class folders (noise compresses badly: a pessimistic decode)."""
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(d / f"{i:06d}.jpg", quality=90)
    return root


def pipeline_rate(dataset, img_size: int, batch: int, workers: int, batches: int) -> float:
    """Images/s of loading + augmenting `batches` batches (after one untimed batch)."""
    loader = make_loader(dataset, batch, seed=0, num_workers=workers)
    set_epoch(loader, 0)
    augment = PretrainAugment(img_size)
    g = torch.Generator().manual_seed(0)
    it = iter(loader)
    augment(next(it)["images"], g)
    n, t = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images = next(it)["images"]
        except StopIteration:
            set_epoch(loader, 1)
            it = iter(loader)
            images = next(it)["images"]
        augment(images, g)
        n += images.shape[0]
    return n / (time.perf_counter() - t)


def train_rate(model_kw: dict, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model("mae", model_kw).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    imgs = torch.randn(batch, 3, model.img_size, model.img_size)
    g = torch.Generator().manual_seed(0)

    def step():
        model(imgs, generator=g).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="an image folder (default: synthetic JPEGs)")
    parser.add_argument("--images", type=int, default=512, help="synthetic images to write")
    parser.add_argument("--cifar", default="builtin", help="CIFAR-10 source (data.root)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers for folder and shards")
    parser.add_argument("--batch", type=int, default=16, help="batch of the 224 px pipelines and of ViT-B")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per pipeline")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per model")
    parser.add_argument("--quick", action="store_true", help="smoke test: 48 images of 80 x 60 px, tiny model")
    parser.add_argument("--out", default=None,
                        help="JSON report (default benchmarks/results/data_loading[_quick].json)")
    args = parser.parse_args()
    out = Path(args.out or f"benchmarks/results/data_loading{'_quick' if args.quick else ''}.json")
    size, img_size = ((80, 60), 32) if args.quick else ((500, 375), 224)
    cifar_batch = 16 if args.quick else 128
    if args.quick:
        args.images, args.batch, args.batches, args.steps = 48, 8, 4, 1
    tiny = dict(preset="mae_vit_tiny_cifar_patch4", **(dict(depth=2, decoder_depth=1) if args.quick else {}))
    big = tiny if args.quick else dict(preset="mae_vit_base_patch16")

    report = {**machine(), "workers": args.workers, "pipelines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else synthetic_folder(Path(tmp) / "images", args.images, size)
        shard_dir = Path(tmp) / "shards"
        write_shards(str(folder), str(shard_dir), shard_size=max(8, args.images // 8))
        load = round(img_size * 256 / 224)
        rows = [
            ("cifar", build_dataset("cifar10", args.cifar, "train", 32), 32, cifar_batch, 0, tiny, cifar_batch),
            ("folder", build_dataset("folder", str(folder), "train", img_size, load_size=load), img_size, args.batch,
             args.workers, big, args.batch),
            ("shards", ShardDataset(str(shard_dir), load_size=load), img_size, args.batch, args.workers, big,
             args.batch),
        ]
        trained: dict[str, float] = {}
        print(f"{'pipeline':<8} {'workers':>7} {'batch':>5} {'pipeline img/s':>15} {'model':<10} {'train img/s':>12} "
              f"{'ratio':>6}")
        for name, dataset, px, batch, workers, model_kw, train_batch in rows:
            rate = pipeline_rate(dataset, px, batch, workers, args.batches)
            key = f"{model_kw['preset']}@{train_batch}"
            if key not in trained:
                trained[key] = train_rate(model_kw, train_batch, args.steps)
            model = "quick" if args.quick else ("cifar_tiny" if model_kw is tiny else "vit_b16")
            report["pipelines"][name] = {"images_per_s": rate, "workers": workers, "batch": batch, "model": model,
                                         "train_images_per_s": trained[key], "ratio": rate / trained[key]}
            print(f"{name:<8} {workers:>7} {batch:>5} {rate:>15.1f} {model:<10} {trained[key]:>12.1f} "
                  f"{rate / trained[key]:>5.1f}x")
    write_report(report, out)


if __name__ == "__main__":
    main()
