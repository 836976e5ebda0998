"""WebDataset shards: written from an image folder, streamed once per epoch across ranks and workers."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.data import DataError, ImageFolder, ShardDataset, build_dataset, make_loader, set_epoch, write_shards
from mimkit.data.shards import expand_braces
from mimkit.train import checkpoint
from mimkit.train.loop import pretrain

N = 37  # images (one unreadable), 3 classes; shards of 5: 8 shards, the last with 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread (two spin against the loader workers on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i in range(N - 1):
        cls = root / ("cat", "dog", "fox")[i % 3]
        cls.mkdir(exist_ok=True)
        pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(cls / f"{i:02d}.{'png' if i % 4 == 0 else 'jpeg'}")
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert main(["data", "shard", str(folder), str(out), "--shard-size", "5"]) == 0
    return out


def test_the_cli_writes_webdataset_shards_and_an_index(folder, shards):
    index = json.loads((shards / "index.json").read_text())
    assert index["num_samples"] == N and index["classes"] == ["cat", "dog", "fox"]
    assert [s["num_samples"] for s in index["shards"]] == [5] * 7 + [2]
    names = [m.name for m in tarfile.open(shards / "shard-000000.tar")]
    assert names[:2] == ["000000" + Path(names[0]).suffix, "000000.cls"]
    assert {Path(n).suffix for n in names} <= {".jpg", ".png", ".cls"}
    # the bytes are the files', unchanged; labels as decimal text; rewritten identically
    source = ImageFolder(str(folder), load_size=0)
    stored = {}
    for i in range(len(index["shards"])):
        with tarfile.open(shards / f"shard-{i:06d}.tar") as tar:
            stored.update({m.name: tar.extractfile(m).read() for m in tar})
    images = sorted(v for k, v in stored.items() if not k.endswith(".cls"))
    assert images == sorted(Path(source.path(i)).read_bytes() for i in range(len(source)))
    assert sorted(int(v) for k, v in stored.items() if k.endswith(".cls")) == sorted(source.labels.tolist())
    again = write_shards(str(folder), str(shards.parent / "again"), shard_size=5)
    assert again == index and (shards.parent / "again" / "shard-000003.tar").read_bytes() == (
        shards / "shard-000003.tar").read_bytes()


def _paths(view: ShardDataset, epoch: int, workers: int, batch: int = 3, start: int = 0) -> list[list[str]]:
    view.set_epoch(epoch, start)
    loader = DataLoader(view, batch_size=batch, num_workers=workers, collate_fn=lambda s: [x.path for x in s])
    return list(loader)


def test_every_image_exactly_once_per_epoch_across_two_ranks_and_two_workers(shards):
    ds = ShardDataset(str(shards), load_size=16, shuffle_buffer=4)
    orders = []
    for epoch in range(2):
        seen = [p for rank in range(2) for batch in _paths(ds.split(rank, 2, seed=0), epoch, workers=2)
                for p in batch]
        assert len(seen) == N and len(set(seen)) == N  # all of them, none twice
        orders.append(seen)
    assert orders[0] != orders[1]  # shard order and buffer shuffled per epoch
    assert sorted(orders[0]) == sorted(orders[1])


def test_training_views_give_every_rank_the_same_whole_batches_and_resume_mid_epoch(shards):
    ds = ShardDataset(str(shards), load_size=16, shuffle_buffer=4)
    views = [ds.split(rank, 2, batch_size=3, seed=5) for rank in range(2)]
    assert [len(v) for v in views] == [18, 18]  # 37 // 2 = 18 per rank: 6 batches of 3
    batches = [_paths(v, epoch=1, workers=2) for v in views]
    assert [len(b) for b in batches] == [6, 6] and all(len(x) == 3 for b in batches for x in b)
    flat = [p for b in batches for x in b for p in x]
    assert len(set(flat)) == len(flat) == 36
    # Resuming after 4 batches (2 from each worker) continues with the same last 2 batches.
    assert _paths(views[0], epoch=1, workers=2, start=12) == batches[0][4:]
    assert _paths(views[1], epoch=1, workers=2, start=3) == batches[1][1:]  # one of worker 0's only


def test_samples_decode_like_a_folder_and_bad_files_are_reported(folder, shards):
    ds = build_dataset("shards", str(shards), "train", img_size=16, load_size=16)
    samples = list(ds)  # rank 0 of 1, shard order
    assert len(samples) == N and ds.classes == ["cat", "dog", "fox"]
    bad = [s for s in samples if s.image is None]
    assert len(bad) == 1 and bad[0].reason == "not a recognised image format" and bad[0].label == 1
    assert all(s.image.shape == (3, 16, 16) and s.image.dtype == torch.uint8 for s in samples if s.image is not None)
    folder_images = sorted(x.image.flatten().tolist() for x in (ImageFolder(str(folder), 16)[i] for i in range(N))
                           if x.image is not None)
    assert sorted(s.image.flatten().tolist() for s in samples if s.image is not None) == folder_images
    # A glob or brace pattern over the shard files reads the same samples; counts come from index.json.
    pattern = ShardDataset(str(shards / "shard-{000000..000003}.tar"), load_size=16)
    assert len(pattern) == 20 and [s.path for s in pattern] == [s.path for s in samples[:20]]
    assert expand_braces("a{0..2}b{x,y}") == ["a0bx", "a0by", "a1bx", "a1by", "a2bx", "a2by"]
    assert len(ShardDataset(str(shards / "shard-*.tar"), load_size=16)) == N


def test_a_truncated_shard_keeps_the_epoch_length(shards, tmp_path):
    for f in shards.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    data = (tmp_path / "shard-000001.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(data[: len(data) // 2])
    samples = list(ShardDataset(str(tmp_path), load_size=16))
    assert len(samples) == N
    assert any("truncated" in s.reason for s in samples if s.image is None)


def test_pretraining_streams_shards_and_resumes_exactly(shards, tmp_path):
    args = ["data.dataset=shards", f"data.root={shards}", "data.num_workers=2", "data.shuffle_buffer=8",
            "model.preset=mae_vit_tiny_cifar_patch4", "model.depth=1", "model.decoder_depth=1", "model.embed_dim=64",
            "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_num_heads=2", "train.batch_size=4",
            "train.epochs=2", "train.ckpt_every=3", "train.log_every=1", "train.vis_images=2"]
    full = pretrain(load_config(None, [*args, f"out_dir={tmp_path / 'full'}"]))
    assert full["step"] == 18  # 37 images, batch 4: 9 steps per epoch
    assert (tmp_path / "full" / "pictures" / "recon-00000018.png").is_file()

    class Stop(Exception):
        pass

    def stop(info):
        if info.step == 13:
            raise Stop

    with pytest.raises(Stop):
        pretrain(load_config(None, [*args, f"out_dir={tmp_path / 'cut'}"]), hooks=[stop])
    pretrain(load_config(None, [*args, f"out_dir={tmp_path / 'cut'}"]), resume="auto")  # from step 12, mid-epoch
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "checkpoint-00000018.pt")["model"]
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "checkpoint-00000018.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Evaluation reads the same stream (its decoded size came from dataset[i], which a stream has not).
    ckpt = str(tmp_path / "full" / "checkpoints" / "checkpoint-00000018.pt")
    assert main(["eval", "knn", ckpt, "data.split=train", "val_split=train", f"out_dir={tmp_path / 'knn'}"]) == 0
    assert 0 <= json.loads((tmp_path / "knn" / "results.json").read_text())["top1"] <= 100


def test_make_loader_splits_a_stream(shards):
    ds = ShardDataset(str(shards), load_size=16)
    loader = make_loader(ds, 4, seed=0, rank=1, world_size=2, num_workers=0)
    set_epoch(loader, 3, start=8)
    assert len(loader) == 4 and len(list(loader)) == 2  # 18 // 4 = 4 batches; 2 of them already done


# --- hostile shards and folders ------------------------------------------------------------------


def _png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (8, 8, 3), generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.uint8).numpy()).save(buf, "PNG")
    return buf.getvalue()


def _hand_written(tmp_path: Path, members: list[tuple[str, bytes]], classes=("a", "b")) -> Path:
    """One shard with exactly these members, and its index."""
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stems = {Path(name).name.partition(".")[0] for name, _ in members}
    index = {"format": "webdataset", "classes": list(classes), "num_samples": len(stems),
             "shards": [{"name": "shard-000000.tar", "num_samples": len(stems)}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    return tmp_path


def test_members_that_are_too_large_badly_named_or_mislabelled_are_counted_skips(tmp_path):
    image = _png_bytes()
    root = _hand_written(tmp_path, [
        ("0.png", image), ("0.cls", b"1"),  # fine
        ("1.png", image + b"\0" * 5000), ("1.cls", b"0"),  # over the cap below
        ("sub/2.png", image), ("sub/2.cls", b"0"),  # a path, not a plain member name
        ("3.png", image), ("3.cls", b"2"),  # only classes 0 and 1 exist
        ("4.png", image), ("4.cls", b"9" * 300),  # would overflow the loader's int64
        ("5.png", image), ("5.cls", b"-1"),
    ])
    ds = ShardDataset(str(root), load_size=8, max_member_bytes=len(image) + 100)
    samples = list(ds)
    assert [s.label for s in samples] == [1, 0, -1, -1, -1, -1]
    assert samples[0].image is not None and samples[0].image.shape == (3, 8, 8)
    reasons = [s.reason for s in samples[1:]]
    assert reasons[0] == f"member 1.png is {len(image) + 5000} bytes, more than data.max_member_bytes " \
                         f"({len(image) + 100})"
    assert reasons[1] == "member name 'sub/2.cls' is not a plain file name"  # the last such member
    assert reasons[2] == "label b'2' is not an integer in 0 .. 1"
    assert reasons[3].startswith("label b'99999") and reasons[4] == "label b'-1' is not an integer in 0 .. 1"
    assert all(s.image is None for s in samples[1:])
    # the loader counts them like unreadable files, and a config sets the cap
    cfg = load_config(None, ["data.dataset=shards", f"data.root={root}", "data.max_member_bytes=10"])
    assert build_dataset("shards", str(root), "train", img_size=8, max_member_bytes=cfg.data.max_member_bytes,
                         ).max_member_bytes == 10


@pytest.mark.parametrize("index, message", [
    ("{not json", r"index\.json: not valid JSON \(JSONDecodeError: "),
    ("[1, 2]", r"index\.json: not a mimkit shard index"),
    ('{"format": "webdataset", "shards": {"a": 1}}', r"index\.json: not a mimkit shard index"),
    ('{"format": "webdataset", "shards": [{"name": "../../etc/passwd", "num_samples": 1}]}',
     r"shards\[0\] must name a file in this folder \(no path components\)"),
    ('{"format": "webdataset", "shards": [{"name": "/etc/passwd", "num_samples": 1}]}',
     r"shards\[0\] must name a file in this folder"),
    ('{"format": "webdataset", "shards": [{"name": "s.tar", "num_samples": -3}]}',
     r"shards\[0\] \(s\.tar\): num_samples must be an integer in 0 \.\. 2147483647, got -3"),
    ('{"format": "webdataset", "shards": [{"name": "s.tar", "num_samples": "12"}]}',
     r"num_samples must be an integer in 0 \.\. 2147483647, got '12'"),
    ('{"format": "webdataset", "shards": [{"name": "s.tar", "num_samples": 1000000000000000000000000000000}]}',
     r"num_samples must be an integer in 0 \.\. 2147483647, got 1000000000000000000000000000000"),  # found by fuzzing
    ('{"format": "webdataset", "shards": [{"name": "s.tar", "num_samples": 1e400}]}',
     r"num_samples must be an integer in 0 \.\. 2147483647, got inf"),
    ('{"format": "webdataset", "classes": "abc", "shards": []}', r"classes must be a list of names"),
    ('{"format": "webdataset", "shards": []}', r"no shards found at "),
])
def test_a_bad_index_is_a_one_line_data_error(tmp_path, index, message):
    (tmp_path / "index.json").write_text(index)
    with pytest.raises(DataError, match=message):
        ShardDataset(str(tmp_path), load_size=8)


def test_data_shard_never_leaves_the_folder_nor_opens_what_is_not_a_file(tmp_path, caplog):
    import os

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png_bytes(1))
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.png").write_bytes(_png_bytes())
    (root / "a" / "link.png").symlink_to(outside / "secret.png")  # a file out of the folder
    (root / "a" / "dir").symlink_to(outside)  # a folder out of it
    (root / "b").symlink_to(outside)  # a class out of it
    (root / "a" / "inside.png").symlink_to(root / "a" / "0.png")  # a link within it is fine
    os.mkfifo(root / "a" / "fifo.png")  # would block forever
    (root / "a" / "zero.png").symlink_to("/dev/zero")  # would exhaust memory
    with caplog.at_level("WARNING"):
        assert main(["data", "shard", str(root), str(tmp_path / "out")]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["classes"] == ["a"] and index["num_samples"] == 2
    members = [m.name for m in tarfile.open(tmp_path / "out" / "shard-000000.tar")]
    assert sorted(members) == ["000000.cls", "000000.png", "000001.cls", "000001.png"]
    assert "outside" in caplog.text and "fifo.png" in caplog.text and "zero.png" in caplog.text


def test_max_side_resizes_large_images_to_jpeg_and_records_it(tmp_path, capsys):
    root = tmp_path / "big"
    (root / "a").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (300, 400, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(root / "a" / "wide.png")  # 400 x 300: resized to 100 x 75, as JPEG
    Image.fromarray(pixels[:60, :80]).save(root / "a" / "small.jpg", quality=75)  # 80 x 60: kept as it is
    (root / "a" / "broken.jpg").write_bytes(b"not an image")  # kept as it is, skipped when read
    out = tmp_path / "shards"
    assert main(["data", "shard", str(root), str(out), "--max-side", "100", "--quality", "85"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert (index["max_side"], index["jpeg_quality"], index["resized"]) == (100, 85, 1)
    with tarfile.open(out / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".cls")}
    sizes = sorted(Image.open(io.BytesIO(b)).size for b in members.values() if b != b"not an image")
    assert sizes == [(80, 60), (100, 75)] and (root / "a" / "small.jpg").read_bytes() in members.values()
    assert sum(name.endswith(".jpg") for name in members) == 3  # the PNG became a JPEG
    samples = list(ShardDataset(str(out), load_size=16))
    assert sum(s.image is None for s in samples) == 1
    assert all(s.image.shape == (3, 16, 16) for s in samples if s.image is not None)
    assert main(["data", "shard", str(root), str(tmp_path / "x"), "--quality", "0"]) == 2
    assert capsys.readouterr().err == "mimkit: error: JPEG quality must be in 1 .. 95, got 0\n"
