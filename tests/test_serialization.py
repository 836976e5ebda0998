"""The one safe reader: for every format mimkit reads, a file crafted to run code is refused and the
code never runs (its marker file stays absent); the honest file of the same format still reads."""

from __future__ import annotations

import io
import json
import pickle
import warnings

import pytest
import torch

from mimkit import load
from mimkit.cli import main
from mimkit.data import load_cifar10
from mimkit.models.vit import VisionTransformer
from mimkit.serialization import (
    DCP_METADATA,
    SHARDED_META,
    WeightsError,
    read_dcp,
    read_dcp_metadata,
    read_module_pickle,
    read_sharded,
    read_torch,
    unpickle,
)
from mimkit.tokenizers import read_weights as read_tokenizer_weights


class _WritesMarker:
    """Unpickling this creates `marker`: the proof that a file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _encoder() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2)


def _sharded_checkpoint(path, optimizer_extra: dict | None = None):
    """A real sharded (DCP) mimkit checkpoint of a tiny encoder, written in one process."""
    import torch.distributed.checkpoint as dcp

    model = _encoder()
    state = {"model": model.state_dict(), "optimizer": {"state": {"pos_embed": {"exp_avg": torch.ones(3)}},
                                                 **(optimizer_extra or {})}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: no-dist mode"
        dcp.save(state, checkpoint_id=str(path))
    cfg = {"model": dict(model.arch)}
    torch.save({"step": 3, "method": "vit", "config": cfg}, path / SHARDED_META)
    return model


def test_a_sharded_checkpoint_reads_whole(tmp_path):
    model = _sharded_checkpoint(tmp_path / "ckpt")
    state = read_sharded(tmp_path / "ckpt")
    assert state["step"] == 3 and state["model"].keys() == model.state_dict().keys()
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())
    loaded = load(tmp_path / "ckpt")
    assert torch.equal(loaded.pos_embed, model.pos_embed)


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    _sharded_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    (tmp_path / "ckpt" / DCP_METADATA).write_bytes(pickle.dumps(_WritesMarker(marker)))
    for read in (read_dcp_metadata, read_dcp, read_sharded, load):
        with pytest.raises(WeightsError, match=r"\.metadata: refused or unreadable DCP metadata .*builtins\.exec"):
            read(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--to", "timm", "--out", str(tmp_path / "x.pth")]) == 2
    assert main(["eval", "knn", str(tmp_path / "ckpt")]) == 2
    assert not marker.exists()


def test_dcp_non_tensor_items_are_read_weights_only(tmp_path):
    """DCP stores non-tensor values (optimizer settings) with torch.save and reads them back with
    `weights_only=False`; mimkit's planner reads them weights-only."""
    marker = tmp_path / "ran"
    _sharded_checkpoint(tmp_path / "ckpt", {"param_groups": [{"lr": 0.5, "hook": _WritesMarker(marker)}]})
    with pytest.raises(WeightsError, match=r"ckpt: item optimizer\.param_groups.*refused or unreadable"):
        read_sharded(tmp_path / "ckpt")
    assert not marker.exists()
    _sharded_checkpoint(tmp_path / "ok", {"param_groups": [{"lr": 0.5, "betas": (0.9, 0.95)}]})
    assert read_sharded(tmp_path / "ok")["optimizer"]["param_groups"][0] == {"lr": 0.5, "betas": (0.9, 0.95)}


@pytest.mark.parametrize("name", ["../outside.distcp", "/etc/hostname", "sub/x.distcp", "missing.distcp"])
def test_dcp_storage_must_be_a_plain_file_in_the_directory(tmp_path, name):
    _sharded_checkpoint(tmp_path / "ckpt")
    (tmp_path / "outside.distcp").write_bytes((tmp_path / "ckpt" / "__0_0.distcp").read_bytes())
    meta_file = tmp_path / "ckpt" / DCP_METADATA
    metadata = pickle.loads(meta_file.read_bytes())  # an honest file, written by DCP itself
    for info in metadata.storage_data.values():
        info.relative_path = name
    meta_file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(WeightsError, match=f"names storage {name!r}, which is not a plain file in"):
        read_sharded(tmp_path / "ckpt")


def test_tokenizer_pickles_that_would_run_code_are_refused_in_both_torch_formats(tmp_path):
    marker = tmp_path / "ran"
    zipped, legacy = tmp_path / "zip.pkl", tmp_path / "legacy.pkl"
    torch.save({"w": torch.zeros(2), "hook": _WritesMarker(marker)}, zipped)
    # torch's legacy format starts with a pickled magic number, which torch.load reads with
    # `pickle_module.load` before any unpickler of the caller's: put the payload there.
    legacy.write_bytes(pickle.dumps(_WritesMarker(marker), protocol=2) + b"rest of the file")
    for path in (zipped, legacy):
        with pytest.raises(WeightsError, match=rf"{path.name}: refusing to unpickle builtins\.exec"):
            read_tokenizer_weights(path)
    assert not marker.exists()
    good = tmp_path / "good.pkl"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3)), good, _use_new_zipfile_serialization=False)
    assert read_module_pickle(good)[0].weight.shape == (3, 2)  # a whole pickled module, legacy format


def test_torch_files_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": _encoder().state_dict(), "x": _WritesMarker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match=r"evil\.pt: holds pickled builtins\.exec"):
        read_torch(tmp_path / "evil.pt")
    assert not marker.exists()


def test_cifar_batches_that_would_run_code_are_refused(tmp_path):
    import tarfile

    marker = tmp_path / "ran"
    data = pickle.dumps({b"data": _WritesMarker(marker), b"labels": []})
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"data_batch_1.*refusing to unpickle builtins\.exec"):
        load_cifar10(str(tmp_path / "evil.tar.gz"), "train", cache_dir=None)
    assert not marker.exists()


def test_the_unpickler_refuses_before_looking_a_name_up():
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle os.system"):
        unpickle(b"cos\nsystem\n(S'true'\ntR.", {})
    assert unpickle(pickle.dumps({"a": [1, 2.5, "x"]}), {}) == {"a": [1, 2.5, "x"]}


def test_hugging_face_shard_index_cannot_point_outside_its_directory(tmp_path):
    from mimkit.export import export

    export(_encoder(), tmp_path / "hf", "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    index = {"weight_map": {"vit.embeddings.cls_token": "../elsewhere.safetensors"}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"index\.json: names '\.\./elsewhere\.safetensors', not a file in"):
        load(tmp_path / "hf")
