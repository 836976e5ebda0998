"""Property-based fuzzing of the three readers of untrusted input: the config layer, the image decoder and
the shard reader. For any input each gives a clean result or its documented error (ConfigError,
BadImageError, DataError / FileNotFoundError), and never hangs, crashes or grows memory without bound.
Seeded (derandomize), so CI runs the same examples every time."""

import io
import json
import resource
import tarfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mimkit.cli import config_reference
from mimkit.config import Config, ConfigError, load_config
from mimkit.data import BadImageError, DataError, Sample, ShardDataset, decode_image
from mimkit.models import resolve_model_config

FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- config ---------------------------------------------------------------------------------------

KEYS = sorted({key.split(" ")[0] for key, _ in config_reference(Config)})
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["auto", "cpu", "cuda:3", "fp16", "folder", "mae", "cae"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))


def _yaml(value) -> str:
    return json.dumps(value, allow_nan=True).replace("NaN", ".nan").replace("Infinity", ".inf")


@FUZZ
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=20)), VALUES), max_size=6))
def test_any_override_gives_a_config_or_a_config_error(pairs):
    overrides = [f"{key}={_yaml(value)}" for key, value in pairs if "=" not in key]
    try:
        cfg = load_config(None, overrides)
        resolve_model_config(cfg.method, cfg.model)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)


@FUZZ
@given(st.binary(max_size=400))
def test_any_recipe_file_gives_a_config_or_a_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as e:
        assert "\n" not in str(e)


# --- image decoder --------------------------------------------------------------------------------


def _image_bytes(fmt: str, size: tuple[int, int], mode: str) -> bytes:
    rng = np.random.default_rng(size[0] * 31 + size[1])
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


VALID = [_image_bytes(fmt, size, mode) for fmt, mode in [("PNG", "RGB"), ("JPEG", "L"), ("GIF", "P"),
                                                         ("BMP", "RGB"), ("TIFF", "CMYK"), ("WEBP", "RGB"),
                                                         ("PNG", "RGBA")] for size in [(1, 1), (13, 7)]]


@st.composite
def damaged_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 6))):  # overwrite, cut or insert bytes anywhere, headers included
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        edit = draw(st.sampled_from(["set", "cut", "insert"]))
        if edit == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif edit == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@FUZZ
@given(st.one_of(damaged_images(), st.binary(max_size=200)), st.sampled_from([0, 8]))
def test_any_bytes_decode_to_an_image_or_a_bad_image_error(data, size):
    before = _max_rss_mb()
    try:
        image = decode_image(data, size)
    except BadImageError as e:
        assert e.reason and "\n" not in str(e)
    else:
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
        assert size == 0 or image.shape[1:] == (size, size)
    assert _max_rss_mb() - before < 200  # a damaged header never makes the decoder allocate without bound


# --- shard reader ---------------------------------------------------------------------------------


def _shard(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBER_NAMES = st.one_of(st.sampled_from(["0.png", "0.cls", "1.jpg", "1.cls", "2.png", "../3.png", "a/4.cls",
                                          ".hidden.png", "5", "6.cls.png"]),
                         st.text(st.characters(codec="ascii", exclude_characters="\0"), min_size=1, max_size=12))
MEMBER_DATA = st.one_of(st.sampled_from(VALID[:4]), st.sampled_from([b"0", b"1", b"-1", b"99999999999999", b" 1\n"]),
                        st.binary(max_size=64))
COUNTS = st.one_of(st.integers(-2, 12), st.sampled_from(["3", 2.5, None, True, [], 10**30]))


@FUZZ
@given(st.lists(st.tuples(MEMBER_NAMES, MEMBER_DATA), max_size=8), COUNTS, st.sampled_from([None, 40]),
       st.sampled_from(["ok", "cut", "garbage"]),
       st.one_of(st.just(["a", "b"]), st.just([]), st.just("ab"), st.lists(st.integers(), max_size=2)))
def test_any_shard_gives_samples_or_a_data_error(tmp_path_factory, members, count, cut, damage, classes):
    root = tmp_path_factory.mktemp("shards")
    data = _shard(members)
    if damage == "cut":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = data[:512] + bytes(range(256)) * 2
    (root / "shard-000000.tar").write_bytes(data)
    index = {"format": "webdataset", "classes": classes, "shards": [{"name": "shard-000000.tar", "num_samples": count}]}
    (root / "index.json").write_text(json.dumps(index))
    before = _max_rss_mb()
    try:
        ds = ShardDataset(str(root), load_size=8, max_member_bytes=cut or 1 << 20)
    except (DataError, FileNotFoundError) as e:
        assert "\n" not in str(e)
        return
    samples = list(ds)
    assert len(samples) == count and all(isinstance(s, Sample) for s in samples)
    for s in samples:
        assert (s.image is None) == bool(s.reason)
        assert s.image is None or s.image.shape == (3, 8, 8)
        assert -1 <= s.label < max(len(classes), 1) or (not classes and 0 <= s.label < 2**31)
    assert _max_rss_mb() - before < 200


def test_the_fuzzed_readers_handle_their_happy_path(tmp_path):
    """The properties above hold trivially if every input is refused: the intact inputs are accepted."""
    assert decode_image(VALID[0]).shape == (3, 1, 1)
    (tmp_path / "shard-000000.tar").write_bytes(_shard([("0.png", VALID[2]), ("0.cls", b"1")]))
    (tmp_path / "index.json").write_text(json.dumps(
        {"format": "webdataset", "classes": ["a", "b"], "shards": [{"name": "shard-000000.tar", "num_samples": 1}]}))
    [sample] = list(ShardDataset(str(tmp_path), load_size=8))
    assert sample.label == 1 and sample.image.shape == (3, 8, 8)
    assert load_config(None, ["train.epochs=2"]).train.epochs == 2
    assert Path(tmp_path / "index.json").exists()
