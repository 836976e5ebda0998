"""The one safe reader: every file mimkit loads goes through here, and nothing in a file may construct
an object outside an allow-list.

  - torch.save files (`.pt`, `.pth`, `.bin`): `torch.load(weights_only=True)` plus `WEIGHTS_GLOBALS`
    (argparse.Namespace in official MAE/DeiT checkpoints, NumPy's random state in mimkit's);
  - `.safetensors`: no code at all, by the format;
  - whole pickled modules (the DALL-E tokenizer's `encoder.pkl`): `read_module_pickle`, whose
    unpickler admits torch's weights-only globals and `torch.nn` module classes, and stubs the
    classes of named foreign packages; every pickle torch reads from such a file (the legacy
    format's header pickles included) goes through it;
  - `torch.distributed.checkpoint` (DCP) directories: their `.metadata` pickle admits DCP's metadata
    classes only, every storage file they name must be a plain file name inside the directory, and
    their non-tensor items are read weights-only (DCP itself unpickles all three without limits);
  - CIFAR-10's pickled batches: dicts, lists and NumPy arrays only (`CIFAR_GLOBALS`).

A refused file raises `WeightsError` (or `pickle.UnpicklingError` from `Unpickler`) naming what it
holds; a global is never resolved, so never run, before it is checked.

Writing: `fsync_dir` and `os_error` are the pieces every durable write (checkpoints, exports) uses.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import types
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit: the message names the file and the offending keys."""


SHARDED_META = "state.pt"  # a sharded (FSDP) training checkpoint's non-tensor state, beside DCP's files
DCP_METADATA = ".metadata"
MAX_DCP_METADATA_BYTES = 1 << 30  # a ViT-H checkpoint's metadata is a few MB


def fsync_dir(directory: str | Path) -> None:
    """Make a rename (or a deletion) in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e` (torch.save and safetensors report a failed write as an error whose
    cause or context it is), or None."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def os_reason(e: OSError) -> str:
    """An OS error in words, e.g. "disk full ([Errno 28])"."""
    import errno

    reason = "disk full" if e.errno == errno.ENOSPC else e.strerror or str(e)
    return f"{reason} ([Errno {e.errno}])" if e.errno is not None else reason


# --------------------------------------------------------------------------- allow-lists and the unpickler


def _name(obj: object) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _numpy_reconstruct() -> dict[str, object]:
    """NumPy's array pickling functions under both names (NumPy 1: `numpy.core`, NumPy 2: `numpy._core`):
    a file written under one major version names them by its path."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    out = {}
    for sub in ("core", "_core"):
        out[f"numpy.{sub}.multiarray._reconstruct"] = core.multiarray._reconstruct
        out[f"numpy.{sub}.numeric._frombuffer"] = core.numeric._frombuffer
    return out


def weights_globals() -> list:
    """What a torch.save weights file may pickle besides tensors and plain containers (the `safe_globals`
    of `torch.load(weights_only=True)`): official MAE and DeiT training checkpoints keep their argparse
    Namespace, mimkit checkpoints NumPy's random state."""
    import argparse

    import numpy as np

    allowed = [argparse.Namespace, np.ndarray, np.dtype]
    if hasattr(np, "dtypes"):  # NumPy >= 1.25 pickles a dtype's class
        allowed.append(np.dtypes.UInt32DType)
    return allowed + [(f, name) for name, f in _numpy_reconstruct().items() if "multiarray" in name]


def cifar_globals() -> dict[str, object]:
    """What CIFAR-10's python batches hold: dicts, lists, bytes and NumPy arrays."""
    import numpy as np

    return {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype, "_codecs.encode": __import__("_codecs").encode,
            **_numpy_reconstruct()}


def torch_globals() -> dict[str, object]:
    """torch's own weights-only allow-list: tensors, storages, dtypes, torch.Size, OrderedDict, ..."""
    from torch._weights_only_unpickler import _get_allowed_globals

    return dict(_get_allowed_globals())


def dcp_globals() -> dict[str, object]:
    """The classes a DCP `.metadata` pickle is made of (`torch.distributed.checkpoint.metadata`)."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    names = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
             "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    out = {f"torch.distributed.checkpoint.metadata.{n}": getattr(metadata, n) for n in names if hasattr(metadata, n)}
    out["torch.distributed.checkpoint.filesystem._StorageInfo"] = filesystem._StorageInfo
    out["torch.serialization._get_layout"] = torch.serialization._get_layout
    for module in ("pathlib", "pathlib._local"):  # Python 3.13 moved the classes to pathlib._local
        out[f"{module}.PosixPath"] = out[f"{module}.PurePosixPath"] = pathlib.PurePosixPath
    return torch_globals() | out


class _Stub(nn.Module):
    """Stands in for any class of a foreign package while unpickling a whole pickled module."""


class Unpickler(pickle.Unpickler):
    """A pickle reader that resolves only the globals in `allowed` (dotted name -> object); the classes
    of the packages in `stubs` become `_Stub` modules, and `nn_modules=True` also admits `torch.nn`
    module classes. Anything else (`os.system`, `builtins.eval`, ...) raises before it is looked up."""

    def __init__(self, file, allowed: Mapping[str, object], stubs: tuple[str, ...] = (), nn_modules: bool = False,
                 **kwargs):
        super().__init__(file, **kwargs)
        self.allowed, self.stubs, self.nn_modules = allowed, stubs, nn_modules

    def find_class(self, module: str, name: str):
        # protocol 2 (torch.save's) names builtins as Python 2 did: `__builtin__.set`
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if f"{module}.{name}" in self.allowed:
            return self.allowed[f"{module}.{name}"]
        if module.split(".")[0] in self.stubs:
            return _Stub
        if self.nn_modules and module.startswith("torch.nn.modules.") and "." not in name:
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                return obj
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not in the allow-list of what this "
                                     "file may hold")


def unpickle(data: bytes, allowed: Mapping[str, object], **kwargs) -> object:
    """`pickle.loads` restricted to `allowed` (see `Unpickler`)."""
    return Unpickler(io.BytesIO(data), allowed, **kwargs).load()


# --------------------------------------------------------------------------- torch.save and safetensors files


def _reason(e: BaseException) -> str:
    """The first line of what went wrong, for a one-line message (torch's weights-only errors put the
    reason after a paragraph of advice)."""
    text = str(e).split("WeightsUnpickler error:")[-1].strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _regular_file(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise WeightsError(f"{path}: not a regular file")
    return path


def read_torch(path: str | Path) -> object:
    """Whatever a `.pt`/`.pth`/`.bin` (torch.save) or `.safetensors` file holds, loaded on the CPU;
    a missing or unreadable file raises a one-line error naming it."""
    path = _regular_file(Path(path))
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        with torch.serialization.safe_globals(weights_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated archive, pickle error, not a torch file, a global not allowed, ...
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise WeightsError(
                f"{path}: holds pickled {', '.join(unsafe)}, which could run code when loaded; mimkit reads "
                "tensors, plain containers, argparse.Namespace and NumPy arrays only. If you trust the file, "
                "save its weights alone: torch.save(torch.load(path, weights_only=False)['model'], 'weights.pt')"
            ) from None
        raise WeightsError(f"{path}: cannot read weights, the file is corrupt or not a PyTorch checkpoint "
                           f"({_reason(e)})") from None


def _unsafe_globals(path: Path) -> list[str]:
    """The pickled classes and functions of a torch.save file that `read_torch` does not allow."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip archive at all: the caller reports corruption
        return []
    allowed = {g[1] if isinstance(g, tuple) else _name(g) for g in weights_globals()}
    return [g for g in found if g not in allowed]


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and the string metadata of a `.safetensors` file."""
    from safetensors import safe_open

    path = _regular_file(Path(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # bad header, truncated data, ...
        raise WeightsError(f"{path}: cannot read weights, the file is corrupt or not safetensors "
                           f"({type(e).__name__}: {e})") from None


def read_module_pickle(path: str | Path, stubs: tuple[str, ...] = ()) -> object:
    """A torch.save file that may hold whole pickled `torch.nn` modules (zip or legacy format), read with
    `Unpickler(torch_globals(), stubs, nn_modules=True)`: a file naming any other global is refused."""
    path = _regular_file(Path(path))

    class Restricted(Unpickler):  # a class: torch.load subclasses `pickle_module.Unpickler`
        def __init__(self, file, **kwargs):
            super().__init__(file, torch_globals(), stubs=stubs, nn_modules=True, **kwargs)

    # torch.load uses `pickle_module.Unpickler` for the data pickle and `pickle_module.load` for the legacy
    # format's header pickles: both must be restricted, or a legacy file runs code in its first pickle.
    module = types.SimpleNamespace(Unpickler=Restricted, load=lambda file, **kw: Restricted(file, **kw).load(),
                                   __name__="mimkit_restricted_pickle")
    try:
        # weights_only=False only because a whole module is not a weights-only file: the unpickler is ours
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: {e}") from None
    except Exception as e:
        raise WeightsError(f"{path}: cannot read, the file is corrupt or not a PyTorch file ({_reason(e)})") from None


# --------------------------------------------------------------------------- DCP (sharded checkpoint) directories


def _dcp_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader with its metadata read by `read_dcp_metadata` (DCP's own uses plain pickle)."""

        def read_metadata(self, *args, **kwargs) -> Metadata:
            if kwargs.get("rank") is not None:
                raise WeightsError(f"{self.path}: per-rank DCP metadata is not supported")
            metadata = read_dcp_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _safe_planner(base: type) -> type:
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(base):
        """DCP's load planner, reading non-tensor items weights-only (DCP's uses `weights_only=False`)."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                with torch.serialization.safe_globals(weights_globals()):
                    obj = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as e:
                raise WeightsError(f"item {fqn}: refused or unreadable ({_reason(e)})") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafePlanner


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and os.sep not in name and "/" not in name \
        and "\0" not in name and (os.altsep is None or os.altsep not in name)


def read_dcp_metadata(path: str | Path):
    """A DCP directory's `.metadata`, unpickled with `dcp_globals()` only and checked: a `Metadata`, whose
    storage files are plain names of regular files in the directory, at non-negative offsets, without
    transforms; its unflattening paths short."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    file = path / DCP_METADATA
    if not file.is_file():
        raise WeightsError(f"{path}: not a complete sharded checkpoint (no DCP {DCP_METADATA})")
    if file.stat().st_size > MAX_DCP_METADATA_BYTES:
        raise WeightsError(f"{file}: {file.stat().st_size} bytes, more than DCP metadata can be "
                           f"({MAX_DCP_METADATA_BYTES})")
    try:
        metadata = unpickle(file.read_bytes(), dcp_globals())
    except Exception as e:  # a refused global, or a malformed pickle
        raise WeightsError(f"{file}: refused or unreadable DCP metadata ({_reason(e)})") from None
    if not isinstance(metadata, Metadata):
        raise WeightsError(f"{file}: holds a {type(metadata).__name__}, not DCP Metadata")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not _plain_name(name) or not (path / name).is_file() or (path / name).is_symlink():
            raise WeightsError(f"{file}: names storage {name!r}, which is not a plain file in {path}")
        if not all(isinstance(v, int) and v >= 0 for v in (info.offset, info.length)):
            raise WeightsError(f"{file}: storage {name!r} at a bad offset or length ({info.offset}, {info.length})")
        if getattr(info, "transform_descriptors", None):
            raise WeightsError(f"{file}: storage transforms {info.transform_descriptors} are not supported")
    for keys in (metadata.planner_data or {}).values():
        if not isinstance(keys, tuple | list) or not all(
                isinstance(k, str) or (isinstance(k, int) and 0 <= k < 1 << 20) for k in keys):
            raise WeightsError(f"{file}: malformed planner data {str(keys)[:100]}")
    return metadata


def _dcp_call(path: Path, run: Callable[[], object]) -> object:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return run()
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        if isinstance(e, CheckpointException):  # DCP wraps the errors of every rank's reader: (error, trace)
            e = next(iter(e.failures.values()))[0] if e.failures else RuntimeError(str(e))
        if isinstance(e, WeightsError):
            raise WeightsError(f"{path}: {e}") from None
        raise WeightsError(f"{path}: cannot read the sharded checkpoint ({_reason(e)})") from None


def read_dcp(path: str | Path) -> dict:
    """Everything a DCP directory holds, gathered whole in this process (its tensors unsharded)."""
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    read_dcp_metadata(path)  # fail early, with the metadata's own message
    state: dict = {}
    _dcp_call(path, lambda: _load_state_dict(state, storage_reader=_dcp_reader_class()(path),
                                             planner=_safe_planner(_EmptyStateDictLoadPlanner)(), no_dist=True))
    return state


def dcp_load(state: dict, path: str | Path) -> None:
    """`torch.distributed.checkpoint.load` of `state` (in place, resharded to this process group) through
    the safe reader and planner; a collective under torchrun."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    path = Path(path)
    read_dcp_metadata(path)
    _dcp_call(path, lambda: dcp.load(state, storage_reader=_dcp_reader_class()(path),
                                     planner=_safe_planner(DefaultLoadPlanner)()))


def read_sharded_meta(path: str | Path) -> dict:
    """The non-tensor state (step, RNG, config, method, ...) of a sharded training checkpoint, a
    directory written with `torch.distributed.checkpoint`, checking that its DCP part is complete."""
    path = Path(path)
    read_dcp_metadata(path)
    state = read_torch(path / SHARDED_META)
    if not isinstance(state, dict) or "step" not in state:
        raise WeightsError(f"{path / SHARDED_META}: not a mimkit sharded checkpoint state (no 'step' entry)")
    return state


def read_sharded(path: str | Path) -> dict:
    """A sharded training checkpoint gathered whole in this process: its non-tensor state plus "model"
    (whole weights) and "optimizer" (state keyed by parameter name)."""
    meta = read_sharded_meta(path)
    tensors = read_dcp(path)
    if not {"model", "optimizer"} <= tensors.keys():
        raise WeightsError(f"{path}: a sharded checkpoint holds 'model' and 'optimizer', this one "
                           f"{', '.join(map(str, tensors)) or 'nothing'}")
    return {**meta, "model": tensors["model"], "optimizer": tensors["optimizer"]}
