"""Image tokenizers: frozen networks that turn pixels into discrete codes, the targets of BEiT / CAE.

A tokenizer is one file in this folder and one line in `TOKENIZERS`. The contract, which is all a
model uses:

    vocab_size   number of codes (the width of the prediction head);
    downsample   input pixels per code along a side (DALL-E: 8, so 112 px -> 14 x 14 codes);
    forward(pixels: (B, 3, h * downsample, w * downsample) in [0, 1]) -> (B, h * w) int64 codes,
                 row-major like the patches;
    load_weights(state: Mapping[str, Tensor]) loads its own weights from a state dict (strict).

Weights are never part of a model's checkpoint: `build_tokenizer` reads them from a local path or URL
each time a model needs them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from mimkit.serialization import WeightsError, read_module_pickle, read_safetensors
from mimkit.tokenizers.dalle import DalleTokenizer

TOKENIZERS: dict[str, type[nn.Module]] = {"dalle": DalleTokenizer}
RANDOM = "random"  # `weights` value for a randomly initialised tokenizer: tests and smoke runs only


def fetch(source: str, cache_dir: str | Path = "~/.cache/mimkit") -> Path:
    """A local file for `source`: a path as is, or a URL (http, https, file) downloaded once into
    `cache_dir/tokenizers/`."""
    scheme = urlparse(source).scheme
    if scheme not in ("http", "https", "file"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer weights file")
        return path
    target = Path(cache_dir).expanduser() / "tokenizers" / Path(urlparse(source).path).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(source, str(target), progress=False)
    return target


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a `.safetensors` file, a saved state dict (bare or under `state_dict` / `model`),
    or a whole pickled module such as OpenAI's `encoder.pkl`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    # Official DALL-E weights (`encoder.pkl`) are a pickled `dall_e.encoder.Encoder`; its package pins
    # torchvision and more, and only the tensors are needed, so its classes become stubs.
    obj = read_module_pickle(path, stubs=("dall_e",))
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: neither a state dict nor a pickled module")
    return dict(obj)


def build_tokenizer(name: str, weights: str, cache_dir: str | Path = "~/.cache/mimkit") -> nn.Module:
    """A frozen tokenizer in eval mode: `weights` is a local path or URL, or `random` (seeded init, for tests)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r} (known: {', '.join(TOKENIZERS)})")
    if not weights:
        raise ValueError(f"the {name} tokenizer needs weights: set model.tokenizer_weights to a path or URL "
                         f"(or '{RANDOM}' for a smoke test)")
    tokenizer = TOKENIZERS[name]()
    if weights != RANDOM:
        tokenizer.load_weights(read_weights(fetch(weights, cache_dir)))
    return tokenizer.eval().requires_grad_(False)
