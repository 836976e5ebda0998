"""Tests for mimkit.data: decoding and the bad-file policy, datasets, sampler, loader, transforms."""

import hashlib
import io
import os
import pickle
import runpy
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kornia.geometry.transform import crop_and_resize
from PIL import Image

from mimkit.data import (
    CIFAR10,
    BadImageError,
    DataError,
    EvalTransform,
    ImageFolder,
    PretrainAugment,
    ResumableSampler,
    build_dataset,
    check_skipped,
    cifar,
    decode,
    decode_image,
    download_cifar10,
    load_cifar10,
    make_loader,
    normalize,
    verify_checksum,
)
from mimkit.data.transforms import crop_boxes, random_resized_crop_params

ROOT = Path(__file__).resolve().parents[1]


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def _write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# --- image folders ---------------------------------------------------------------------------


def test_image_folder_modes_labels_and_classes(tmp_path):
    root = tmp_path / "imgs"
    (root / "cats" / "nested").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "cats" / "a.jpg", quality=95)
    Image.new("L", (30, 40), 128).save(root / "cats" / "nested" / "b.PNG")
    Image.new("RGBA", (24, 24), (0, 0, 255, 10)).save(root / "dogs" / "c.png")
    green = Image.new("RGB", (50, 20), (0, 255, 0))
    green.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "dogs" / "d.gif")
    (root / "dogs" / "notes.txt").write_text("not listed")
    (root / "dogs" / "._c.png").write_bytes(b"macOS metadata, not an image")

    ds = ImageFolder(str(root), load_size=16)
    assert ds.classes == ["cats", "dogs"]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert [Path(ds.path(i)).name for i in range(len(ds))] == ["a.jpg", "b.PNG", "c.png", "d.gif"]
    samples = [ds[i] for i in range(len(ds))]
    for s in samples:
        assert s.image.dtype == torch.uint8 and s.image.shape == (3, 16, 16) and s.reason == ""
    expected = [(255, 0, 0), (128, 128, 128), (0, 0, 255), (0, 255, 0)]
    for s, rgb in zip(samples, expected, strict=True):
        assert (s.image.int() - torch.tensor(rgb).view(3, 1, 1)).abs().max() <= 3  # JPEG is lossy


def test_decode_16bit_and_cmyk(tmp_path):
    Image.fromarray(np.full((6, 6), 128 * 257, np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "print.jpg")
    deep = decode.decode_image(str(tmp_path / "deep.png"))
    assert deep.shape == (3, 6, 6) and (deep == 128).all()  # not clipped to white
    red = decode.decode_image((tmp_path / "print.jpg").read_bytes(), size=4)
    assert red.shape == (3, 4, 4) and red[0].min() > 240 and red[1:].max() < 15


def test_unreadable_files_are_skipped_and_strict_raises(tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    good = _encode(_noise(32, 32))
    for i in range(5):
        (root / "a" / f"good{i}.jpg").write_bytes(good)
    bad = {"empty.jpg": b"", "text.jpg": b"just some text\n", "trunc.jpg": good[: len(good) // 2]}
    for name, data in bad.items():
        (root / "a" / name).write_bytes(data)

    ds = build_dataset("folder", str(root), "train", img_size=32, load_size=32)  # no root/train: root itself
    # Sorted order: empty, good0-4, text, trunc -> batches [empty g0 g1] [g2 g3 g4] [text trunc].
    loader = make_loader(ds, 3, seed=0, shuffle=False, drop_last=False, num_workers=1)  # decoding in a worker
    seen, sizes = {}, []
    for batch in loader:
        check_skipped(batch, strict=False, seen=seen)
        sizes.append(len(batch["images"]))
        assert batch["images"].dtype == torch.uint8 and batch["labels"].dtype == torch.int64
    assert sizes == [2, 3, 0]
    reasons = {Path(p).name: r for p, r in seen.items()}
    assert sorted(seen) == sorted(str(root / "a" / n) for n in bad)
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["text.jpg"] == "not a recognised image format"
    assert "truncated" in reasons["trunc.jpg"]

    with pytest.raises(BadImageError, match=r"unreadable image .*empty\.jpg: empty file"):
        for batch in loader:  # the persistent worker serves a second pass
            check_skipped(batch, strict=True, seen={})


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(str(tmp_path / "nowhere"), 8)
    (tmp_path / "hollow" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="hollow"):
        ImageFolder(str(tmp_path / "hollow"), 8)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", str(tmp_path), "train", 8)


def test_folder_without_classes_and_with_split_subfolders(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (10, 7)).save(flat / "x.png")
    ds = build_dataset("folder", str(flat), "train", img_size=224)
    assert ds.load_size == (256, 256) and ds.labels.tolist() == [0] and ds[0].image.shape == (3, 256, 256)

    for split, n in (("train", 3), ("test", 2)):
        for k in range(n):
            (tmp_path / "data" / split / "k").mkdir(parents=True, exist_ok=True)
            Image.fromarray(_noise(9, 12, k)).save(tmp_path / "data" / split / "k" / f"{k}.png")
    assert len(build_dataset("folder", str(tmp_path / "data"), "test", 32)) == 2
    assert len(build_dataset("folder", str(tmp_path / "data"), "train", 32, limit=2)) == 2


# --- CIFAR-10 --------------------------------------------------------------------------------


def test_cifar_builtin_subset_and_cache(tmp_path, monkeypatch):
    train = load_cifar10("builtin", "train", cache_dir=str(tmp_path))
    assert train.images.shape == (3000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [300] * 10 and train.skipped == []
    assert 100 < train.images.float().mean() < 140  # real photos, CIFAR-10's mean pixel is ~120
    test = load_cifar10("builtin", "test", cache_dir=None)
    assert len(test) == 500 and torch.bincount(test.labels).tolist() == [50] * 10
    assert len(list(tmp_path.glob("cifar10-train-*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(cifar, "decode_image", no_decoding)
    again = build_dataset("cifar10", "builtin", "train", img_size=32, cache_dir=str(tmp_path), limit=100)
    assert torch.equal(again.images, train.images[::30]) and torch.equal(again.labels, train.labels[::30])
    assert torch.bincount(again.labels).tolist() == [10] * 10  # a limit spreads over every class
    sample = again[7]
    assert torch.equal(sample.image, train.images[7 * 30]) and sample.label == int(train.labels[7 * 30])
    for batched, single in zip(again.__getitems__([7, 3]), [again[7], again[3]], strict=True):
        assert torch.equal(batched.image, single.image) and batched[1:] == single[1:]


def _fake_python_batches(n: int = 4) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    return {
        name: {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(10, size=n).tolist(),
        }
        for name in ("data_batch_1", "data_batch_2", "test_batch")
    }


def test_cifar_python_tarball_and_directory(tmp_path):
    batches = _fake_python_batches()
    files = {f"cifar-10-batches-py/{k}": pickle.dumps(v, protocol=2) for k, v in batches.items()}
    files["cifar-10-batches-py/readme.html"] = b"<html/>"
    _write_tar(tmp_path / "fake-cifar.tar.gz", files)

    train = load_cifar10(str(tmp_path / "fake-cifar.tar.gz"), "train", cache_dir=str(tmp_path / "cache"))
    data = np.concatenate([batches["data_batch_1"][b"data"], batches["data_batch_2"][b"data"]])
    assert train.images.shape == (8, 3, 32, 32)
    assert torch.equal(train.images[0, 1].flatten(), torch.from_numpy(data[0, 1024:2048]))  # R, G, B planes
    assert torch.equal(train.images, torch.from_numpy(data).view(8, 3, 32, 32))
    assert train.labels.tolist() == batches["data_batch_1"][b"labels"] + batches["data_batch_2"][b"labels"]
    test = load_cifar10(str(tmp_path / "fake-cifar.tar.gz"), "test", cache_dir=None)
    assert test.labels.tolist() == batches["test_batch"][b"labels"]

    with tarfile.open(tmp_path / "fake-cifar.tar.gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    from_dir = load_cifar10(str(tmp_path / "extracted"), "train", cache_dir=None)
    assert torch.equal(from_dir.images, train.images) and torch.equal(from_dir.labels, train.labels)


def test_cifar_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    _write_tar(tmp_path / "evil.tar.gz", {"data_batch_1": pickle.dumps({b"data": Evil(), b"labels": []})})
    with pytest.raises(ValueError, match=r"evil\.tar\.gz:data_batch_1.*refusing to unpickle builtins\.print"):
        load_cifar10(str(tmp_path / "evil.tar.gz"), "train", cache_dir=None)


def test_cifar_jpeg_layout_skips_bad_files(tmp_path):
    cat, dog = _noise(32, 32, 1), _noise(32, 32, 2)
    files = {
        "cifar/train/cat/0000.png": _encode(cat, "PNG"),  # PNG, so pixels compare exactly
        "cifar/train/dog/0001.png": _encode(dog, "PNG"),
        "cifar/train/dog/0002.jpg": _encode(dog)[:200],
        "cifar/train/dog/0003.png": _encode(_noise(40, 40), "PNG"),
        "cifar/train/dog/._0004.jpg": b"macOS metadata",
        "cifar/test/cat/0000.png": _encode(cat, "PNG"),
        "cifar/README.txt": b"hello",
    }
    _write_tar(tmp_path / "mine.tgz", files)
    ds = load_cifar10(str(tmp_path / "mine.tgz"), "train", cache_dir=str(tmp_path))
    assert ds.labels.tolist() == [3, 5]  # cat, dog
    assert torch.equal(ds.images[0], torch.from_numpy(cat).permute(2, 0, 1))
    assert [Path(name).name for name, _ in ds.skipped] == ["0002.jpg", "0003.png"]
    assert "expected 32x32 pixels, got 40x40" in ds.skipped[1][1]
    with pytest.raises(BadImageError, match=r"mine\.tgz:cifar/train/dog/0002\.jpg"):
        load_cifar10(str(tmp_path / "mine.tgz"), "train", cache_dir=str(tmp_path), strict=True)  # cache hit
    with pytest.raises(ValueError, match="no CIFAR-10 test data"):
        _write_tar(tmp_path / "empty.tar.gz", {"notes.txt": b"x"})
        load_cifar10(str(tmp_path / "empty.tar.gz"), "test", cache_dir=None)


def test_checksum_mismatch_names_the_file(tmp_path):
    fake = tmp_path / "cifar10-jpeg.tar.gz"
    fake.write_bytes(b"not the real archive")
    with pytest.raises(ValueError, match=r"cifar10-jpeg\.tar\.gz: sha256 is [0-9a-f]+, expected 0972878090"):
        build_dataset("cifar10", str(fake), "train", img_size=32, cache_dir=None)
    other = tmp_path / "cifar-10-python.tar.gz"
    other.write_bytes(b"also fake")
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz: md5 is"):
        verify_checksum(str(other))
    verify_checksum(str(tmp_path / "cifar10-jpeg.tar.gz"), name="unknown-name.tar.gz")  # unknown: not checked


def test_download_verifies_md5_without_network(tmp_path, monkeypatch):
    fake_urlopen = lambda url, timeout: io.BytesIO(b"half a download")  # noqa: E731
    monkeypatch.setattr(cifar.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(ValueError, match="failed verification.*md5"):
        download_cifar10(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-python.tar.gz.lock"]  # no .part, no archive


def test_processes_that_ask_for_the_download_at_once_download_it_once(tmp_path, monkeypatch):
    """Four processes started together (torchrun with data.root=download): one downloads, slowly; the
    others wait for it and read the same verified file."""
    import threading
    import time

    archive = b"the archive, in 3 slow chunks " * 1000
    calls = []

    class Slow(io.BytesIO):
        def read(self, n=-1):
            time.sleep(0.05)
            return super().read(n if n > 0 else 10_000)

    def fake_urlopen(url, timeout):
        calls.append(url)
        return Slow(archive)

    monkeypatch.setattr(cifar.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setitem(cifar.KNOWN_CHECKSUMS, "cifar-10-python.tar.gz", ("md5", hashlib.md5(archive).hexdigest()))
    got, errors = [], []

    def fetch():  # each thread opens its own lock file description, as separate processes do
        try:
            got.append(download_cifar10(str(tmp_path)))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 1
    assert got == [str(tmp_path / "cifar-10-python.tar.gz")] * 4
    assert (tmp_path / "cifar-10-python.tar.gz").read_bytes() == archive


# --- sampler and loader ----------------------------------------------------------------------


def test_sampler_order_resume_and_ranks():
    s = ResumableSampler(10, seed=3)
    epoch0 = list(s)
    assert sorted(epoch0) == list(range(10)) and epoch0 != list(range(10))
    assert list(ResumableSampler(10, seed=3)) == epoch0
    assert list(ResumableSampler(10, seed=4)) != epoch0
    s.set_epoch(1)
    epoch1 = list(s)
    assert sorted(epoch1) == list(range(10)) and epoch1 != epoch0
    s.set_epoch(1, start=4)
    assert list(s) == epoch1[4:] and len(s) == 6
    assert list(ResumableSampler(10, seed=3, shuffle=False)) == list(range(10))

    halves = [list(ResumableSampler(10, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert set(halves[0]).isdisjoint(halves[1]) and sorted(halves[0] + halves[1]) == list(range(10))
    assert [i for pair in zip(*halves, strict=True) for i in pair] == epoch0  # one global order, dealt out
    thirds = [list(ResumableSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(t) for t in thirds] == [4, 4, 4] and set(sum(thirds, [])) == set(range(10))  # padded
    cut = [list(ResumableSampler(10, seed=3, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    assert [len(t) for t in cut] == [3, 3, 3] and len(set(sum(cut, []))) == 9
    with pytest.raises(ValueError):
        ResumableSampler(10, seed=0, rank=2, world_size=2)


def test_loader_resumes_mid_epoch_with_persistent_workers():
    n = 20
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    ds = CIFAR10(images, torch.arange(n))  # image i is filled with i
    loader = make_loader(ds, 4, seed=0, num_workers=1)
    rng = torch.get_rng_state()
    loader.sampler.set_epoch(2)
    full = [b for b in loader]
    loader.sampler.set_epoch(2, start=8)
    tail = torch.cat([b["labels"] for b in loader])
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    labels = torch.cat([b["labels"] for b in full])
    assert torch.equal(tail, labels[8:])
    sampler = ResumableSampler(n, seed=0, drop_last=True)
    sampler.set_epoch(2)
    assert labels.tolist() == list(sampler)
    assert all(torch.equal(b["images"][:, 0, 0, 0].long(), b["labels"]) for b in full)
    assert full[0]["images"].shape == (4, 3, 4, 4) and full[0]["skipped"] == []


# --- transforms ------------------------------------------------------------------------------


def _images(b: int = 8, s: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_pretrain_augment_is_seeded():
    imgs, aug = _images(), PretrainAugment(16)
    a = aug(imgs, torch.Generator().manual_seed(1))
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, aug(imgs, torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, aug(imgs, torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(1)
    aug(imgs, g)
    assert not torch.allclose(a, aug(imgs, g))  # the generator advances


def test_pretrain_augment_identity_crop_is_plain_normalisation():
    imgs = _images()
    out = PretrainAugment(32, scale=(1, 1), ratio=(1, 1), hflip=False)(imgs, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, normalize(imgs), atol=1e-4, rtol=0)


def test_pretrain_augment_resamples_like_torch_resize():
    # Half-pixel centres (align_corners=False), as torchvision's resize and PIL use.
    imgs = _images(4, 12)
    out = PretrainAugment(40, scale=(1, 1), ratio=(1, 1), hflip=False)(imgs, torch.Generator().manual_seed(0))
    expected = F.interpolate(imgs.float(), size=40, mode="bicubic", align_corners=False).clamp(0, 255)
    torch.testing.assert_close(out, normalize(expected), atol=1e-3, rtol=0)
    # A crop at its own size is a plain slice.
    box = crop_boxes(*(torch.tensor([v], dtype=torch.float32) for v in (2, 3, 8, 8)), 8)
    crop = crop_and_resize(imgs[:1].float(), box, (8, 8), mode="bicubic", padding_mode="border")
    torch.testing.assert_close(crop, imgs[:1, :, 2:10, 3:11].float(), atol=1e-3, rtol=0)


def _torchvision_rrc(height, width, scale, ratio, g):
    """torchvision.transforms.RandomResizedCrop.get_params (v0.20), with a generator."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round((target_area * aspect_ratio) ** 0.5))
        h = int(round((target_area / aspect_ratio) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_crop_params_follow_torchvision():
    g = torch.Generator().manual_seed(0)
    top, left, h, w = random_resized_crop_params(4000, 32, 40, (0.2, 1.0), (3 / 4, 4 / 3), g)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 40).all()
    area, aspect = h * w / (32 * 40), w / h
    assert area.min() > 0.17 and area.max() <= 1 and aspect.min() > 0.7 and aspect.max() < 1.4
    # The same statistics as torchvision's sequential loop (restated here) on other random numbers.
    ref = torch.tensor([_torchvision_rrc(32, 40, (0.2, 1.0), (3 / 4, 4 / 3), g) for _ in range(4000)])
    ref_area = ref[:, 2] * ref[:, 3] / (32 * 40)
    assert area.mean().item() == pytest.approx(ref_area.mean().item(), abs=0.015)
    assert (w / h).log().std().item() == pytest.approx((ref[:, 3] / ref[:, 2]).log().std().item(), abs=0.02)
    assert (top / (32 - h).clamp(min=1)).mean().item() == pytest.approx(0.5, abs=0.03)
    # No draw fits: the central crop with the ratio clamped into range (40/32 -> 2: 40 x 20).
    top, left, h, w = random_resized_crop_params(3, 32, 40, (5.0, 6.0), (2.0, 3.0), g)
    assert w.tolist() == [40] * 3 and h.tolist() == [20] * 3
    assert top.tolist() == [6] * 3 and left.tolist() == [0] * 3


def test_pretrain_augment_flips_about_half():
    imgs = _images(200, 8)
    out = PretrainAugment(8, scale=(1, 1), ratio=(1, 1))(imgs, torch.Generator().manual_seed(0))
    plain = normalize(imgs)
    same = (out - plain).abs().amax((1, 2, 3)) < 1e-3
    flipped = (out - plain.flip(-1)).abs().amax((1, 2, 3)) < 1e-3
    assert (same ^ flipped).all() and 70 < int(flipped.sum()) < 130


def test_eval_transform():
    imgs = _images(2, 32)
    torch.testing.assert_close(EvalTransform(32, crop_pct=1.0)(imgs), normalize(imgs))
    # int(28 / 0.875) = 32: no resize, a center crop
    torch.testing.assert_close(EvalTransform(28)(imgs), normalize(imgs[..., 2:30, 2:30]))
    wide = torch.randint(0, 256, (2, 3, 40, 60), dtype=torch.uint8)
    assert EvalTransform(16)(wide).shape == (2, 3, 16, 16)


# --- the shipped subset's tool ---------------------------------------------------------------


def test_make_cifar_subset_is_balanced_and_reproducible(tmp_path):
    tool = runpy.run_path(str(ROOT / "tools" / "make_cifar_subset.py"))
    files = {
        f"top/{s}/{c}/{i:04d}.jpg": f"{s}{c}{i}".encode()
        for s in ("train", "test") for c in ("cat", "dog") for i in range(4)
    }
    _write_tar(tmp_path / "src.tar.gz", files)
    for out in ("a.tar.gz", "b.tar.gz"):
        tool["main"]([str(tmp_path / "src.tar.gz"), str(tmp_path / out), "--train-per-class", "2",
                      "--test-per-class", "1"])
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    assert list(members) == [
        "test/cat/0000.jpg", "test/dog/0000.jpg",
        "train/cat/0000.jpg", "train/cat/0001.jpg", "train/dog/0000.jpg", "train/dog/0001.jpg",
    ]
    assert members["train/dog/0001.jpg"] == b"traindog1"  # original bytes


def _png(path: Path, seed: int = 0) -> None:
    Image.fromarray(_noise(8, 8, seed)).save(path)


def test_folder_scans_end_on_link_loops_and_skip_what_is_not_a_file(tmp_path, caplog):
    root = tmp_path / "imgs"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    _png(root / "a" / "1.png")
    _png(root / "a" / "deep" / "2.png", 1)
    _png(root / "b" / "3.png", 2)
    (root / "a" / "deep" / "loop").symlink_to(root / "a")  # a cycle
    (root / "a" / "self").symlink_to(".")  # a self-link would multiply files without end
    os.mkfifo(root / "b" / "fifo.png")  # opening it would block forever
    (root / "b" / "zero.png").symlink_to("/dev/zero")  # reading it would never end
    (root / "b" / "gone.png").symlink_to(root / "missing.png")
    with caplog.at_level("WARNING"):
        ds = ImageFolder(str(root), load_size=0)
    assert sorted(ds.path(i).removeprefix(str(root) + "/") for i in range(len(ds))) == [
        "a/1.png", "a/deep/2.png", "b/3.png"]
    assert "skipped 3 entries under" in caplog.text and "fifo.png" in caplog.text


def test_an_empty_folder_is_a_data_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match=r"^no image files \(.*\) found under "):
        ImageFolder(str(tmp_path), load_size=0)


def test_an_image_of_too_many_pixels_is_refused_before_it_is_decoded(monkeypatch):
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, "PNG")  # 16 M pixels in a few KB
    assert len(bomb.getvalue()) < 100_000
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(BadImageError, match=r"4000 x 4000 pixels, more than MAX_IMAGE_PIXELS \(1000000\)$"):
        decode_image(bomb.getvalue())
    assert decode_image(_encode(_noise(100, 100), "PNG")).shape == (3, 100, 100)
