"""End-to-end images/s of the pretraining input pipeline, per CPU core, against the official one.

Three pipelines feed 224-px pretraining crops from the same JPEG files, each as a training run would:
  reference  the official MAE/CAE code: PIL decodes the whole file, torchvision's RandomResizedCrop
             (scale 0.2-1, bicubic) + flip + ToTensor + Normalize in the DataLoader workers, default
             collate (float32 batches cross the process boundary);
  before     mimkit before issue 14 (still its evaluation decode): workers resize the shorter side to 256 and
             center-crop, uint8 256-px batches, RandomResizedCrop + flip + normalise batched on the
             main process (`PretrainAugment`);
  workers    mimkit now: each worker draws the crop on the original image, decodes a JPEG at the
             smallest sufficient DCT scale and resamples the box once (`data.crops`); uint8 224-px
             crops cross, flip + normalise batched on the main process.
"Per core" is images per CPU-second, the main process's and its workers' CPU time together (read from
/proc), so that 1 and 2 workers compare on a 2-core machine. The images:
  photos  real photographs (scikit-image's sample photos: `pip install --no-deps scikit-image` ships
          them; or --photos DIR), cut and rescaled to ImageNet-like sizes (long side 400-640 px, aspect
          3:4 to 4:3 and back), re-encoded as JPEG (quality 90);
  12mp    the same photos at 4000 x 3000 (12 MP phone size);
  noise   random-noise JPEGs of 500 x 375, which compress badly: the pessimistic decode.
Fidelity: PSNR of the workers' crop against the reference crop of the same box, on every image set.
Each figure is the median of --repeats rounds that run the three pipelines in turn.

    python benchmarks/data_loading.py               # 256 photos, 48 12-MP photos, 256 noise JPEGs; 1 and 2 workers
    python benchmarks/data_loading.py --quick       # smoke test: a few small images, 1 worker
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from common import machine, write_report
from mimkit.config import IMAGENET_MEAN, IMAGENET_STD
from mimkit.data import ImageFolder, PretrainAugment, make_loader, set_epoch
from mimkit.data.crops import RandomResizedCrop, draw_box, epoch_key

SIZE, SCALE, RATIO = 224, (0.2, 1.0), (3 / 4, 4 / 3)
PIPELINES = ("reference", "before", "workers")
SAMPLE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                 "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")


def sample_photos(folder: str | None) -> list[Image.Image]:
    """The source photographs: the RGB images of `folder`, else scikit-image's bundled sample photos
    (found without importing scikit-image)."""
    if folder is None:
        spec = importlib.util.find_spec("skimage")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("no photos: pip install --no-deps scikit-image (its sample photos), or pass --photos DIR")
        folder = os.path.join(spec.submodule_search_locations[0], "data")
        paths = [os.path.join(folder, n) for n in SAMPLE_PHOTOS if os.path.exists(os.path.join(folder, n))]
    else:
        paths = sorted(os.path.join(folder, n) for n in os.listdir(folder))
    photos = [Image.open(p).convert("RGB") for p in paths]
    return [p for p in photos if min(p.size) >= 256]


def write_photos(root: Path, sources: list[Image.Image], count: int, size: tuple[int, int] | None,
                 seed: int = 0) -> Path:
    """`count` JPEGs (quality 90) in 4 class folders: random cuts of the sources at ImageNet-like sizes,
    or resized to exactly `size`."""
    rng = random.Random(seed)
    for i in range(count):
        src = sources[i % len(sources)]
        if size is None:  # a random cut of the source, at a random ImageNet-like size and aspect
            long_side, aspect = rng.randint(400, 640), rng.uniform(3 / 4, 4 / 3)
            w, h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
            cw = min(src.width, src.height * w / h) * rng.uniform(0.6, 1.0)
            ch = cw * h / w
            x, y = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
            image = src.resize((w, h), Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
        else:
            image = src.resize(size, Image.Resampling.BICUBIC)
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        image.save(d / f"{i:06d}.jpg", quality=90)
    return root


def write_noise(root: Path, count: int, size: tuple[int, int]) -> Path:
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(d / f"{i:06d}.jpg", quality=90)
    return root


class ReferenceDataset(Dataset):
    """The official pipeline's dataset: torchvision's ImageFolder loader + RandomResizedCrop(224,
    bicubic) + RandomHorizontalFlip + ToTensor + Normalize, restated with PIL and torch (torchvision does
    not import beside this torch)."""

    def __init__(self, folder: ImageFolder):
        self.folder = folder
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        with open(self.folder.path(i), "rb") as f:
            im = Image.open(f).convert("RGB")
        top, left, h, w = draw_box(im.height, im.width, SCALE, RATIO, random)  # get_params' arithmetic
        im = im.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        if random.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div_(255)  # ToTensor
        return (x - self.mean) / self.std, int(self.folder.labels[i])


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (Linux /proc), in seconds."""
    total, tick = 0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def measure(loader: DataLoader, step, epoch=None) -> tuple[float, float]:
    """(images/s, images per CPU-second) of the second pass over `loader` (persistent workers, started
    and idle), `step(batch)` on each batch; `epoch(e)` selects pass e where the loader needs it."""
    for e in (0, 1):
        if epoch is not None:
            epoch(e)
        it = iter(loader)
        pids = [os.getpid(), *(w.pid for w in getattr(it, "_workers", []))]
        n, cpu, t = 0, _cpu_seconds(pids), time.perf_counter()
        for _ in range(len(loader)):  # not to the end: the workers' CPU time is read while they live
            n += step(next(it))
        wall, cpu = time.perf_counter() - t, _cpu_seconds(pids) - cpu
    return n / wall, n / max(cpu, 1e-9)


def run_pipeline(name: str, folder: Path, workers: int, batch: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    if name == "reference":
        ds = ReferenceDataset(ImageFolder(str(folder), load_size=0))
        loader = DataLoader(ds, batch, shuffle=True, num_workers=workers, collate_fn=default_collate,
                            drop_last=True, persistent_workers=workers > 0)
        return measure(loader, lambda b: b[0].shape[0])
    crop = RandomResizedCrop(SIZE, SCALE, RATIO) if name == "workers" else None
    ds = ImageFolder(str(folder), load_size=256, crop=crop)
    augment = PretrainAugment(SIZE, SCALE, RATIO, crop=crop is None)
    loader = make_loader(ds, batch, seed=0, num_workers=workers)
    return measure(loader, lambda b: augment(b["images"], g).shape[0], lambda e: set_epoch(loader, e))


def fidelity(folder: Path, count: int) -> dict:
    """PSNR (dB) of the workers' crop against the reference crop (whole file decoded, crop, bicubic
    resize) of the same box, over `count` images."""
    ds, crop, key = ImageFolder(str(folder), load_size=0), RandomResizedCrop(SIZE, SCALE, RATIO), epoch_key(0, 0)
    values = []
    for i in range(min(count, len(ds))):
        im = Image.open(ds.path(i)).convert("RGB")
        top, left, h, w = crop.box(im.height, im.width, key, i)
        ref = np.asarray(im.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
        ours = crop(ds.path(i), key, i).permute(1, 2, 0).numpy()
        mse = np.mean((ours.astype(np.float64) - ref) ** 2)
        values.append(10 * math.log10(255**2 / max(mse, 1e-10)))
    return {"mean_db": float(np.mean(values)), "min_db": float(np.min(values)), "crops": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", default=None, help="a folder of photographs (default: scikit-image's samples)")
    parser.add_argument("--images", type=int, default=256, help="ImageNet-sized photos and noise JPEGs")
    parser.add_argument("--big", type=int, default=48, help="12-MP photos")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the medians are reported")
    parser.add_argument("--sets", default="photos,12mp,noise", help="image sets to run, comma-separated")
    parser.add_argument("--quick", action="store_true", help="smoke test: 24 small images, 1 worker, no photos needed")
    parser.add_argument("--out", default=None,
                        help="JSON report (default benchmarks/results/data_loading[_quick].json)")
    args = parser.parse_args()
    out = Path(args.out or f"benchmarks/results/data_loading{'_quick' if args.quick else ''}.json")
    torch.set_num_threads(1)  # the main process batches flips; its intra-op threads would spin against the workers
    workers = [1] if args.quick else [int(w) for w in args.workers.split(",")]
    args.repeats = 1 if args.quick else args.repeats
    report = {**machine(), "cpu_count": os.cpu_count(), "batch": args.batch, "sets": {}}
    print(f"{'images':<7} {'workers':>7} {'pipeline':<10} {'img/s':>8} {'img/CPU-s':>10} {'vs before':>10} "
          f"{'vs reference':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.quick:
            noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
            sets = {"photos": write_photos(tmp / "photos", [noise], 24, None),
                    "noise": write_noise(tmp / "noise", 24, (300, 225))}
        else:
            photos = sample_photos(args.photos)
            sets = {"photos": write_photos(tmp / "photos", photos, args.images, None),
                    "12mp": write_photos(tmp / "12mp", photos, args.big, (4000, 3000)),
                    "noise": write_noise(tmp / "noise", args.images, (500, 375))}
        for set_name, folder in sets.items():
            if set_name not in args.sets.split(","):
                continue
            entry = report["sets"][set_name] = {"fidelity": fidelity(folder, 8 if args.quick else 64), "runs": {}}
            for w in workers:
                rounds = [{p: run_pipeline(p, folder, w, args.batch) for p in PIPELINES} for _ in range(args.repeats)]
                entry["runs"][str(w)] = runs = {  # medians over interleaved rounds: this VM's speed drifts
                    p: {"images_per_s": float(np.median([r[p][0] for r in rounds])),
                        "images_per_cpu_s": float(np.median([r[p][1] for r in rounds])),
                        "rounds_images_per_cpu_s": [r[p][1] for r in rounds]} for p in PIPELINES}
                for p, r in runs.items():
                    r["per_cpu_vs_before"] = r["images_per_cpu_s"] / runs["before"]["images_per_cpu_s"]
                    r["per_cpu_vs_reference"] = r["images_per_cpu_s"] / runs["reference"]["images_per_cpu_s"]
                    print(f"{set_name:<7} {w:>7} {p:<10} {r['images_per_s']:>8.1f} {r['images_per_cpu_s']:>10.1f} "
                          f"{r['per_cpu_vs_before']:>9.2f}x {r['per_cpu_vs_reference']:>12.2f}x")
            f = entry["fidelity"]
            print(f"{set_name:<7} fidelity of the workers' crops: {f['mean_db']:.1f} dB mean, {f['min_db']:.1f} dB min "
                  f"over {f['crops']} boxes")
    write_report(report, out)


if __name__ == "__main__":
    main()
