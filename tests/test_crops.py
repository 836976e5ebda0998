"""Pretraining crops drawn per sample in the loader workers: torchvision's distribution, the reference's
pixels, DCT-scaled decoding that never goes below the output size, and independence of the workers."""

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from resumed import equal_weights, interrupt_and_resume
from test_data import _torchvision_rrc

from mimkit.config import load_config
from mimkit.data import ImageFolder, ShardDataset, make_loader, set_epoch, write_shards
from mimkit.data.crops import RandomResizedCrop, dct_scale, draw_box, epoch_key
from mimkit.train.loop import pretrain

MAE_SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def _stats(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T.astype(np.float64)
    return {"area": h * w / (height * width), "aspect": np.log(w / h), "cx": (left + w / 2) / width,
            "cy": (top + h / 2) / height}


@pytest.mark.parametrize("height, width, scale", [(375, 500, MAE_SCALE), (200, 900, (0.08, 1.0))])
def test_boxes_follow_torchvision_random_resized_crop(height, width, scale):
    """On a 4:3 photo (MAE's scale) and a 9:2 panorama (CAE's, where many draws fail and the fallback
    runs), the boxes' area fraction, aspect ratio and centre have torchvision's distribution (KS test,
    p < 0.001 threshold), and as many of them reach the image's sides."""
    n = 4000
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    ours = np.array([draw_box(height, width, scale, RATIO, rng) for _ in range(n)])
    ref = np.array([_torchvision_rrc(height, width, scale, RATIO, g) for _ in range(n)])
    critical = 1.95 * math.sqrt(2 / n)  # alpha = 0.001
    a, b = _stats(ours, height, width), _stats(ref, height, width)
    for name in a:
        assert _ks(a[name], b[name]) < critical, name
    for boxes in (ours, ref):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    # Crops come within 2% of each side (a crop of the central 256 x 256 square never comes within 12%).
    for side in (lambda t, x, h, w: x <= 0.02 * width, lambda t, x, h, w: x + w >= 0.98 * width,
                 lambda t, x, h, w: t <= 0.02 * height, lambda t, x, h, w: t + h >= 0.98 * height):
        mine, theirs = side(*ours.T).mean(), side(*ref.T).mean()
        assert mine > 0.02 and abs(mine - theirs) < 4 * math.sqrt(theirs * (1 - theirs) / n)


def test_a_sample_draws_the_same_box_in_any_process_and_another_in_the_next_epoch():
    crop = RandomResizedCrop(224, MAE_SCALE, RATIO)
    k0, k1 = epoch_key(0, 0), epoch_key(0, 1)
    assert crop.box(375, 500, k0, 7) == crop.box(375, 500, k0, 7)
    assert len({crop.box(375, 500, k0, i) for i in range(50)}) == 50
    assert crop.box(375, 500, k0, 7) != crop.box(375, 500, k1, 7) and epoch_key(1, 0) != k0


def _photo(height: int, width: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth shading, edges and some fine texture (quality 90)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    channels = []
    for c in range(3):
        fx, fy = rng.uniform(20, 200, 2)
        v = 128 + 70 * np.sin(x / fx + c) * np.cos(y / fy) + 40 * ((x // 97 + y // 131 + c) % 2)
        channels.append(v + rng.normal(0, 4, (height, width)))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _reference_crop(data: bytes, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The official pipeline: the whole file decoded, then torchvision's resized_crop on the PIL image."""
    top, left, h, w = box
    im = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(im.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / max(mse, 1e-10))


def test_crops_match_the_reference_and_dct_scaling_never_decodes_below_the_output(monkeypatch):
    """Crops of a 1600 x 1200 JPEG, most decoded at 1/2 or 1/4 scale: each matches the reference crop
    of the same box at >= 35 dB PSNR, and the box never has fewer than 224 decoded pixels a side."""
    data, size = _photo(1200, 1600), 224
    decoded = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, want):
        width = self.width
        result = draft(self, mode, want)
        decoded.append(round(width / result[1][2]))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    crop, key = RandomResizedCrop(size, (0.08, 1.0), RATIO), epoch_key(0, 0)
    for i in range(24):
        box = crop.box(1200, 1600, key, i)
        decoded.clear()
        ours = crop(data, key, i).permute(1, 2, 0).numpy()
        s = decoded[0] if decoded else 1
        assert s == dct_scale(box[2], box[3], size) and box[2] / s >= size and box[3] / s >= size
        assert _psnr(ours, _reference_crop(data, box, size)) >= 35, (i, box, s)
    assert {dct_scale(*crop.box(1200, 1600, key, i)[2:], size) for i in range(24)} >= {1, 2, 4}


def test_dct_scale_is_the_largest_that_keeps_the_output_resolution():
    for h in range(1, 2000, 37):
        for w in range(1, 2000, 41):
            s = dct_scale(h, w, 224)
            assert s == 1 or (h >= s * 224 and w >= s * 224)
            assert s == 8 or h < 2 * s * 224 or w < 2 * s * 224


def test_other_formats_and_modes_take_the_plain_path():
    crop, key = RandomResizedCrop(32), epoch_key(0, 0)
    for mode, fmt, colour, grey in (("RGB", "PNG", (200, 200, 200), 200), ("L", "JPEG", 200, 200),
                                    ("RGBA", "PNG", (200, 200, 200, 9), 200), ("I;16", "PNG", 40000, 156)):
        buf = io.BytesIO()
        Image.new(mode, (120, 90), colour).save(buf, fmt)
        out = crop(buf.getvalue(), key, 0)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        assert (out.int() - grey).abs().max() <= 1, mode


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i in range(12):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        (root / f"c{i % 2}" / f"{i:02d}.jpg").write_bytes(_photo(90 + 7 * i, 120 - 3 * i, seed=i))
    return root


def test_worker_count_does_not_change_the_crops(photos, tmp_path):
    crop = RandomResizedCrop(32, MAE_SCALE, RATIO)
    folder = ImageFolder(str(photos), load_size=0, crop=crop)
    batches = {}
    for workers in (0, 2):
        loader = make_loader(folder, 4, seed=3, num_workers=workers)
        set_epoch(loader, 1)
        batches[workers] = [b["images"] for b in loader]
    assert len(batches[0]) == 3 and all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    assert batches[0][0].shape == (4, 3, 32, 32)

    write_shards(str(photos), str(tmp_path / "shards"), shard_size=3)
    shards = ShardDataset(str(tmp_path / "shards"), load_size=0, shuffle_buffer=4, crop=crop)
    by_sample = {}
    for workers in (0, 2):
        loader = make_loader(shards, 4, seed=3, num_workers=workers, drop_last=False)
        set_epoch(loader, 1)
        images = torch.cat([b["images"] for b in loader])
        by_sample[workers] = sorted(images.flatten(1).tolist())  # the same crops, in another batch order
    assert len(by_sample[0]) == 12 and by_sample[0] == by_sample[2]


def test_folder_pretraining_with_worker_crops_resumes_exactly_and_ignores_the_worker_count(photos, tmp_path):
    args = ["data.dataset=folder", f"data.root={photos}", "model.preset=mae_vit_tiny_cifar_patch4",
            "model.depth=1", "model.decoder_depth=1", "train.batch_size=4", "train.epochs=3", "train.ckpt_every=2",
            "train.vis_images=2"]
    pretrain(load_config(None, [*args, "data.num_workers=2", f"out_dir={tmp_path / 'full'}"]))

    cut = load_config(None, [*args, "data.num_workers=0", f"out_dir={tmp_path / 'cut'}"])
    interrupt_and_resume(cut, 5)  # resumed from step 4, mid-epoch, with no workers
    equal_weights(tmp_path / "full", tmp_path / "cut", 9)
