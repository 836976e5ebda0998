"""Weights in: read official MAE, Hugging Face, timm and mimkit files into a ready model.

mimkit's parameter names are those of timm and the official `models_mae.py`, so official MAE and
timm state dicts need no renaming, only unwrapping (`{"model": ...}`, `module.` prefixes). Hugging
Face's ViT / ViTMAE use separate q/k/v projections: a fused qkv is split by rows (`[:D]`, `[D:2D]`,
`[2D:]`) and fused back on the way in. Every load compares every key and shape
(`check_state_dict`) and names what does not fit.

The architecture comes from the source, never from the user's guess: from the config stored in a
mimkit file, or read off the weights (width, depth, patch size from the conv kernel, grid from
`pos_embed`, decoder sizes, classes from `head`). Only the number of attention heads is not in the
weights: it comes from `config.json` when there is one, else from the standard width -> heads
table (`HEADS`), and the caller can always say `num_heads=`.

Formats read (see `read_weights`; the export side is `mimkit.export`):
  - mimkit training checkpoints (`{"model", "method", "config"}`; FSDP's sharded checkpoint
    directories are gathered whole) and the files `mimkit convert`
    and `mimkit export --to official|safetensors` write (the config travels with the weights);
  - official MAE checkpoints under a `model` key: `mae_pretrain_vit_*.pth` (encoder),
    `mae_visualize_vit_*.pth` (encoder + decoder: an `MAE`), `mae_finetuned_vit_*.pth`
    (classifier with `fc_norm` + `head`, average pooling);
  - Hugging Face directories (config.json + model.safetensors / pytorch_model.bin, sharded or not)
    of ViTMAEForPreTraining, ViTMAEModel, ViTModel and ViTForImageClassification, with the names
    transformers 5 uses in memory, the 4.x hub names it writes to disk, or its 5.x save quirk
    `decoder.decoder_encoder.layer.*`;
  - timm ViT state dicts (.pth / .bin / .safetensors; also under `state_dict`).
  - official CAE pretraining checkpoints (`encoder.*`, `regresser.*`; see the end of this file);
  - any of these on the Hugging Face Hub: `hf-hub:ORG/NAME[@REVISION]` (`mimkit.hub`).
New layouts plug in as one entry of `formats()`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mimkit.architecture import (
    build_architecture,
    fit_pos_embed,
    grid_of,
    infer_architecture,
    load_checked,
    method_fields,
    shorten,
    target_grid,
)
from mimkit.config import ConfigError
from mimkit.hub import is_hub, resolve
from mimkit.serialization import WeightsError, read_safetensors, read_sharded, read_torch

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Names: mimkit (timm / official MAE) <-> Hugging Face ViT and ViTMAE
# ---------------------------------------------------------------------------------------------

# Per-block names: mimkit -> transformers 5 (in memory) and -> transformers 4.x (on disk, and what
# transformers 5 still writes with save_pretrained). `attn.q|k|v` are halves of the split qkv.
BLOCK_TO_HF = {
    "attn.q": "attention.q_proj", "attn.k": "attention.k_proj", "attn.v": "attention.v_proj",
    "norm1": "layernorm_before", "attn.proj": "attention.o_proj", "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
BLOCK_TO_HF_LEGACY = {
    "attn.q": "attention.attention.query", "attn.k": "attention.attention.key",
    "attn.v": "attention.attention.value", "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
_BLOCK_FROM_HF = {v: k for k, v in BLOCK_TO_HF.items()} | {v: k for k, v in BLOCK_TO_HF_LEGACY.items()}

# Outside the blocks; the encoder part is prefixed by `vit.` in ViTMAEForPreTraining and
# ViTForImageClassification, and by nothing in ViTModel / ViTMAEModel.
ENCODER_TO_HF = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}
OUTSIDE_TO_HF = {
    "decoder_embed": "decoder.decoder_embed",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm": "decoder.decoder_norm",
    "decoder_pred": "decoder.decoder_pred",
    "head": "classifier",  # ViTForImageClassification's head sits outside `vit.`
}
_HF_BLOCK = re.compile(r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_HF_DECODER_BLOCK = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$")
# ViTModel's pooler (dense + tanh on the cls token) has no counterpart in mimkit, whose models end
# at the final norm; it is dropped on the way in (see `hf_to_mae`).
_HF_POOLER = re.compile(r"^(?:vit\.)?pooler\.dense\.(?:weight|bias)$")


def split_suffix(key: str) -> tuple[str, str]:
    stem, _, leaf = key.rpartition(".")
    return (stem, leaf) if leaf in ("weight", "bias") else (key, "")


def join_key(stem: str, leaf: str) -> str:
    return f"{stem}.{leaf}" if leaf else stem


def hf_to_mae(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ViT / ViTMAE state dict -> mimkit names, q/k/v fused back into qkv.

    Accepts transformers 5 in-memory names (`vit.layers.0.attention.q_proj`), 4.x hub names
    (`vit.encoder.layer.0.attention.attention.query`), the `decoder.decoder_encoder.layer.*` names
    transformers 5 writes for the ViTMAE decoder, with or without the `vit.` prefix. ViTModel's
    `pooler.dense` is dropped: mimkit models end at the final norm, which is what
    `last_hidden_state` is. Any other unknown key raises a `WeightsError` listing them.
    """
    encoder = {v: k for k, v in ENCODER_TO_HF.items()}
    top = {v: k for k, v in OUTSIDE_TO_HF.items()}
    out, unknown, pooler = {}, [], []
    for key, value in state.items():
        stem, leaf = split_suffix(key)
        m = _HF_BLOCK.match(stem) or _HF_DECODER_BLOCK.match(stem)
        bare = stem.removeprefix("vit.")
        if m and m[2] in _BLOCK_FROM_HF:
            stack = "decoder_blocks" if stem.startswith("decoder.") else "blocks"
            out[join_key(f"{stack}.{m[1]}.{_BLOCK_FROM_HF[m[2]]}", leaf)] = value
        elif bare in encoder:
            out[join_key(encoder[bare], leaf)] = value
        elif stem in top:
            out[join_key(top[stem], leaf)] = value
        elif _HF_POOLER.match(key):
            pooler.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"unknown Hugging Face ViT keys: {shorten(unknown)} (mimkit reads ViT, ViTMAE, "
                           "ViTModel and ViTForImageClassification weights)")
    if pooler:
        log.info("dropping the Hugging Face ViT pooler (%s): mimkit models end at the final norm", ", ".join(pooler))
    # Fuse attn.q / attn.k / attn.v back into attn.qkv (rows q, then k, then v).
    for key in [k for k in out if re.search(r"\.attn\.q(\.weight|\.bias)?$", k)]:
        base, _, leaf = key.partition(".attn.q")
        parts = [out.pop(f"{base}.attn.{n}{leaf}", None) for n in "qkv"]
        if any(p is None for p in parts):
            raise WeightsError(f"{base}: q, k and v projections must all be present (missing some of them)")
        out[f"{base}.attn.qkv{leaf}"] = torch.cat(parts, dim=0)
    return out


def _hints_from_hf_config(hf: Mapping, where: str) -> dict:
    """What a Hugging Face config.json adds to the weights: heads, and MAE's masking settings.

    Its `layer_norm_eps` is ignored: the hub configs say 1e-12, but MAE and ViT weights were
    trained with 1e-6, which mimkit always uses.
    """
    kind = hf.get("model_type")
    if kind not in ("vit", "vit_mae"):
        raise WeightsError(f"{where}: model_type {kind!r} is not a ViT; mimkit reads Hugging Face 'vit' and "
                           "'vit_mae' models")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise WeightsError(f"{where}: hidden_act {hf['hidden_act']!r}; mimkit's ViT uses the exact (erf) 'gelu'")
    size = hf.get("image_size")
    sides = size if isinstance(size, list) and len(size) == 2 else [size]
    if size is not None and not all(type(v) is int and v > 0 for v in sides):
        raise WeightsError(f"{where}: image_size {size!r} is neither a side nor [height, width] in pixels")
    hints = {"num_heads": hf.get("num_attention_heads"), "img_size": tuple(size) if isinstance(size, list) else size}
    if kind == "vit_mae":
        hints |= {"decoder_num_heads": hf.get("decoder_num_attention_heads"), "mask_ratio": hf.get("mask_ratio"),
                  "norm_pix_loss": hf.get("norm_pix_loss")}
    return {k: v for k, v in hints.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Reading files (`mimkit.serialization` reads them safely; here: which layout they are in)
# ---------------------------------------------------------------------------------------------


def unwrap_official(obj: Mapping) -> dict[str, Tensor]:
    """An official facebookresearch/mae (`{"model": state}`) or timm (`{"state_dict": state}`)
    checkpoint, or a bare state dict -> state dict.

    Also strips the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes that wrapped saves leave.
    """
    state = obj
    if isinstance(obj, Mapping):
        state = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError("not a state dict: expected a mapping of names to tensors (or one under 'model' "
                           "or 'state_dict')")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def _is_hf(state: Mapping[str, Tensor]) -> bool:
    return any(re.match(r"^(vit\.)?(embeddings\.|encoder\.layer\.|layers\.\d)|^decoder\.decoder_", k) for k in state)


def _is_timm(state: Mapping[str, Tensor]) -> bool:
    return "patch_embed.proj.weight" in state or any(k.startswith("blocks.") for k in state)


def _from_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm / official MAE names are mimkit's. timm's `no_embed_class` models keep no position row for
    the cls token, which is the same as mimkit's zero row: one is added."""
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        state = dict(state, pos_embed=torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1))
    return state


class Format(NamedTuple):
    """A layout of bare state dicts: how to recognise it and how to rename it to mimkit's names."""

    name: str
    detect: Callable[[Mapping[str, Tensor]], bool]
    to_mimkit: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    architecture: Callable[[dict[str, Tensor]], tuple[str, dict]] | None = None
    """(method, model config) from the renamed weights; None: `infer_architecture` reads MAE / ViT."""


def formats() -> list[Format]:
    """The layouts `read_weights` recognises, tried in order (official CAE first: its decoder keys
    `decoder.decoder_blocks.*` would pass for Hugging Face ones). Official MAE uses timm's names.
    A new layout is one more entry here."""
    return [
        Format("official CAE", is_official_cae, cae_from_official,
               lambda state: ("cae", cae_config_from_official(state))),
        Format("Hugging Face", _is_hf, hf_to_mae),
        Format("timm / official MAE", _is_timm, _from_timm),
    ]


@dataclasses.dataclass
class Weights:
    """Weights in mimkit names, with what their source says of the architecture."""

    state: dict[str, Tensor]
    name: str
    """The source, for messages."""
    method: str | None = None
    """Set when the source stores its architecture (mimkit files): then `config` is complete."""
    config: dict = dataclasses.field(default_factory=dict)
    """The model config stored in the source (with `method`), else hints such as heads from config.json."""
    data: dict = dataclasses.field(default_factory=dict)
    """A mimkit training checkpoint's data config (what evaluation defaults to), else empty."""
    guessed: tuple[str, ...] = ()
    """Fields of `config` the source does not state but a table supplied (official CAE's heads)."""


def _mimkit_entry(obj: object) -> tuple[str, dict] | None:
    """(method, model config) of a mimkit file: a training checkpoint or a converted file."""
    if isinstance(obj, Mapping) and {"model", "method", "config"} <= obj.keys() and "model" in obj["config"]:
        return obj["method"], dict(obj["config"]["model"])
    return None


def _weights_of(obj: object, name: str, hints: dict) -> Weights:
    """The state dict in `obj`, in mimkit names, whichever of `formats()` it is in."""
    try:
        state = unwrap_official(obj)
    except WeightsError as e:
        raise WeightsError(f"{name}: {e}") from None
    for fmt in formats():
        if fmt.detect(state):
            try:
                state = fmt.to_mimkit(state)
                if fmt.architecture is None:
                    return Weights(state, name, config=hints)
                return Weights(state, name, *fmt.architecture(state), guessed=("num_heads", "decoder_num_heads"))
            except WeightsError as e:
                raise WeightsError(f"{name}: {e}") from None
    raise WeightsError(
        f"{name}: not a Vision Transformer checkpoint mimkit can read: its keys ({shorten(list(state), 5)}) "
        "match none of the known layouts: official MAE / timm (patch_embed.proj.weight, blocks.0.attn.qkv.weight, "
        "...), Hugging Face ViT / ViTMAE (vit.embeddings.*, encoder.layer.0.*), official CAE, or a mimkit file. "
        "It may come from another architecture.")


def _shard_files(index: Path) -> list[Path]:
    """The weight files a Hugging Face shard index names: plain file names beside it, nothing else."""
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{index}: not a shard index ({type(e).__name__}: {e})") from None
    for name in sorted(map(str, names)):
        if Path(name).name != name or name in ("", ".", "..") or not (index.parent / name).is_file():
            raise WeightsError(f"{index}: names {name!r}, not a file in {index.parent}")
    return sorted(index.parent / name for name in names)


def _read_hf_dir(path: Path) -> Weights:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: a directory of weights needs a config.json (a Hugging Face model)")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{cfg_file}: not valid JSON ({e})") from None
    hints = _hints_from_hf_config(hf, str(cfg_file))
    raw: dict[str, Tensor] = {}
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            files = [path / single]
        elif (path / index).is_file():
            files = _shard_files(path / index)
        else:
            continue
        for f in files:
            raw |= unwrap_official(read_torch(f))
        break
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (nor a sharded index) beside "
                                "config.json")
    try:
        state = hf_to_mae(raw)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    return Weights(state, str(path), config=hints)


def read_weights(source: str | Path | Mapping) -> Weights:
    """Any supported source (see the module docstring) -> `Weights` in mimkit names."""
    if is_hub(source):  # hf-hub:ORG/NAME[@REVISION]: the Hub cache's copy of the repository
        source = resolve(source)
    if isinstance(source, Mapping):
        name, obj, meta = "weights", source, {}
    else:
        path = Path(source)
        name = str(path)
        if path.is_dir() and (path / ".metadata").is_file():  # a sharded (FSDP) training checkpoint
            obj, meta = read_sharded(path), {}
        elif path.is_dir():
            return _read_hf_dir(path)
        elif path.suffix == ".safetensors":
            obj, meta = read_safetensors(path)
            if "mimkit" not in meta and (path.parent / "config.json").is_file() and _is_hf(obj):  # in a HF dir
                return _read_hf_dir(path.parent)
        else:
            obj, meta = read_torch(path), {}
    if "mimkit" in meta:  # written by mimkit.export: the architecture travels in the header
        try:
            entry = json.loads(meta["mimkit"])
            return Weights(dict(obj), name, entry["method"], dict(entry["model"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{name}: the 'mimkit' header entry is damaged ({type(e).__name__}: {e})") from None
    entry = _mimkit_entry(obj)
    if entry is not None:
        return Weights(unwrap_official(obj["model"]), name, *entry, data=dict(obj["config"].get("data") or {}))
    hints = {}
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if args is not None:  # an official MAE training checkpoint keeps its argparse Namespace
        hints = {k: getattr(args, k) for k in ("mask_ratio", "norm_pix_loss") if hasattr(args, k)}
    return _weights_of(obj, name, hints)


def read_state(source: str | Path | Mapping) -> dict[str, Tensor]:
    """A state dict in mimkit names from any supported source (file, directory or mapping)."""
    return read_weights(source).state


def resolve_architecture(weights: Weights, overrides: Mapping) -> tuple[str, dict]:
    """(method, model config) for `weights`: stored or read off the weights, then the caller's overrides."""
    if weights.method is not None:
        method, cfg = weights.method, dict(weights.config)
    else:
        # img_size= among the overrides is where to resample to, not what the weights were made for
        given = {**weights.config, **{k: v for k, v in overrides.items() if k != "img_size"}}
        method, cfg = infer_architecture(weights.state, given, weights.name)
    fields = method_fields(method)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"{weights.name} holds a {method} model, which has no option {', '.join(unknown)} "
                          f"(its options: {', '.join(f for f in fields if f != 'preset')})")
    return method, cfg | dict(overrides)


def load(source: str | Path | Mapping | Weights, device: str | torch.device = "cpu", **overrides) -> nn.Module:
    """A ready model (eval mode) from any supported weights: a file, a Hugging Face directory or a
    state dict; see the module docstring for the formats.

    The architecture is the one stored in mimkit files, else read off the weights. `overrides` are
    model-config fields: `num_heads=` / `decoder_num_heads=` for non-standard widths, `img_size=` to
    resample the position embeddings (bicubic) to another resolution, `mask_ratio=`, ...
    Returns an `MAE` when there is a decoder, else a `VisionTransformer` (with its classifier, if any).
    """
    weights = source if isinstance(source, Weights) else read_weights(source)
    method, cfg = resolve_architecture(weights, overrides)
    grid = target_grid(cfg)
    state = fit_pos_embed(weights.state, grid, grid_of(weights.state, weights.config)) if grid else weights.state
    model = build_architecture(method, cfg)
    return load_checked(model, state, weights.name).to(device).eval()


def load_weights(model: nn.Module, source: str | Path | Mapping) -> nn.Module:
    """Load any supported weights into an existing `model` (e.g. a preset), in place; returns it.

    Position embeddings are resampled to the model's grid. Loading into a bare encoder (a
    `VisionTransformer`) keeps only the source's encoder: parts the encoder does not have at all (an
    MAE decoder, CAE's regressor) are dropped, as MAE's fine-tuning does with a pretraining
    checkpoint. Every other missing, unexpected or misshaped key raises a `WeightsError`.
    """
    from mimkit.models.vit import VisionTransformer

    weights = read_weights(source)
    state = weights.state
    if type(model) is VisionTransformer:
        parts = {k.split(".")[0] for k in model.state_dict()}
        state = {k: v for k, v in state.items() if k.split(".")[0] in parts}
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid:
        state = fit_pos_embed(state, grid, grid_of(weights.state, weights.config))
    return load_checked(model, state, weights.name)


# --------------------------------------------------------------------------- official CAE (Atten4Vis/CAE)

# Official CAE pretraining state dict -> mimkit `CAE` names (models/modeling_cae.py and
# modeling_cae_helper.py of Atten4Vis/CAE; note their spelling `regresser`). First match wins.
_CAE_FROM_OFFICIAL = [
    (r"^encoder\.blocks\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.", ""),  # patch_embed, cls_token, pos_embed, blocks (attn.qkv.weight, attn.q_bias/v_bias), norm
    (r"^encoder_to_regresser(_norm)?\.", r"encoder_to_regressor\1."),
    (r"^rd_pos_embed$", "decoder_pos_embed"),
    (r"^mask_token$", "mask_token"),
    (r"^regresser\.regressor_blocks\.(\d+)\.norm1_([qkv])\.", r"regressor_blocks.\1.norm_\2."),
    (r"^regresser\.regressor_blocks\.(\d+)\.norm2_cross\.", r"regressor_blocks.\1.norm2."),
    (r"^regresser\.regressor_blocks\.(\d+)\.cross_attn\.", r"regressor_blocks.\1.attn."),
    (r"^regresser\.regressor_blocks\.(\d+)\.mlp_cross\.", r"regressor_blocks.\1.mlp."),
    (r"^regresser\.regressor_blocks\.(\d+)\.gamma_([12])_cross$", r"regressor_blocks.\1.ls\2.gamma"),
    (r"^regresser\.norm\.", "regressor_norm."),
    (r"^decoder\.decoder_blocks\.(\d+)\.gamma_([12])$", r"decoder_blocks.\1.ls\2.gamma"),
    (r"^decoder\.decoder_blocks\.", "decoder_blocks."),
    (r"^decoder\.norm\.", "decoder_norm."),
    (r"^decoder\.head\.", "decoder_pred."),
]
# Heads of the official CAE models by width (`cae_{tiny,small,base,large}_patch16_224`: 12, 12, 12, 16).
CAE_OFFICIAL_HEADS = {192: 12, 384: 12, 768: 12, 1024: 16}


def is_official_cae(state: Mapping[str, Tensor]) -> bool:
    """Whether a state dict is an official CAE pretraining checkpoint (`encoder.*`, `regresser.*`)."""
    return any(k.startswith(("regresser.", "encoder.patch_embed.")) for k in state)


def cae_from_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official CAE pretraining state dict (already unwrapped from `{"model": ...}`) -> mimkit `CAE` names.

    The official alignment encoder (`alignment_encoder.*`) is a per-step copy of the encoder's
    weights and is dropped; mimkit computes the alignment target with the encoder itself.
    """
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith("alignment_encoder."):
            continue
        for pattern, repl in _CAE_FROM_OFFICIAL:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        more = " ..." if len(unknown) > 10 else ""
        raise WeightsError(f"unknown official CAE keys: {', '.join(unknown[:10])}{more}")
    return out


def cae_config_from_official(state: Mapping[str, Tensor]) -> dict:
    """A mimkit `model:` section (method `cae`) for an official CAE state dict, in official or mimkit names.

    Sizes are read off the tensors, heads from `CAE_OFFICIAL_HEADS`; a 8192-way head means DALL-E token
    targets. LayerScale values are placeholders (the trained gammas are loaded over them).
    """
    if is_official_cae(state):
        state = cae_from_official(state)

    def count(stack: str) -> int:
        return len({m[1] for k in state if (m := re.match(rf"^{stack}\.(\d+)\.", k))})

    D, C, p, _ = state["patch_embed.proj.weight"].shape
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)  # official CAE checkpoints are square
    Dd = state["decoder_pos_embed"].shape[-1]
    out = state["decoder_pred.weight"].shape[0]
    return dict(
        img_size=grid * p, patch_size=p, in_chans=C, embed_dim=D, depth=count("blocks"),
        num_heads=CAE_OFFICIAL_HEADS.get(D, 12), mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / D,
        qv_bias="blocks.0.attn.q_bias" in state, init_values=0.1 if "blocks.0.ls1.gamma" in state else 0.0,
        decoder_embed_dim=Dd, decoder_num_heads=CAE_OFFICIAL_HEADS.get(Dd, 12),
        regressor_depth=count("regressor_blocks"), decoder_depth=count("decoder_blocks"),
        decoder_init_values=0.1 if "regressor_blocks.0.ls1.gamma" in state else 0.0,
        target="pixels" if out == p * p * C else "tokens",
    )
