"""Weights out: write a mimkit model for timm, the official MAE code, transformers, or as safetensors.

Targets (`export(model, out, to)`, `mimkit export CKPT --to ...`):
  timm         the encoder as a timm `VisionTransformer` state dict (`.pth`, or `.safetensors` by
               suffix; a path without a suffix: a folder that `timm.create_model("local-dir:PATH",
               pretrained=True)` loads, config.json + model.safetensors): `pos_embed` (1, 1 + N, D)
               with the cls row first; `head.*` only when the
               model has a classifier, `fc_norm.*` instead of `norm.*` when it pools by averaging.
               A decoder is never included (timm's ViT has none). CAE's query and value biases
               become the equivalent `attn.qkv.bias` (zero key part), which timm's ViT has.
  official     `{"model": state dict, "method", "config"}` saved with torch.save: the layout of the
               official MAE checkpoints (`checkpoint["model"]` loads into `models_mae` or
               `models_vit` with strict=True), decoder included; the extra entries let `mimkit.load`
               rebuild the model from the file alone.
  hf           a Hugging Face directory (config.json + model.safetensors) that `from_pretrained`
               loads: ViTMAEForPreTraining when there is a decoder, ViTForImageClassification for a
               classifier, ViTModel otherwise (load it with `add_pooling_layer=False`: mimkit has no
               pooler). Weights use the 4.x hub names, which transformers 4 and 5 both read;
               layer_norm_eps is 1e-6, as MAE and ViT were trained. transformers' ViT cannot express
               average pooling (`fc_norm`) or LayerScale: those models raise; use another target.
  safetensors  every weight, plus a JSON header entry `mimkit` = {"method", "model", "version"}
               (method and model config) from which `mimkit.load` rebuilds the model.
  onnx         the encoder's feature extractor (cls token, mean of the patch tokens, or the tokens)
               as an ONNX graph with a dynamic batch, for onnxruntime and other runtimes.
`img_size` resamples the position embeddings (bicubic) first; `encoder_only` drops a decoder.

An export never replaces an existing file or directory unless `overwrite`, and is written beside its
place and renamed into it when complete (fsynced), so a failed write leaves nothing behind and
raises a one-line `WeightsError` with the OS's reason.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from mimkit.architecture import architecture_of, encoder_of, with_img_size
from mimkit.config import IMAGENET_MEAN, IMAGENET_STD, size_pair
from mimkit.convert import (
    BLOCK_TO_HF,
    BLOCK_TO_HF_LEGACY,
    ENCODER_TO_HF,
    OUTSIDE_TO_HF,
    WeightsError,
    join_key,
    split_suffix,
)
from mimkit.serialization import fsync_dir, os_error, os_reason

TARGETS = ("timm", "official", "hf", "safetensors", "onnx")
ONNX_MAX_BYTES = (2**31 - 1) - (64 << 20)  # protobuf's 2 GiB, less room for the graph itself


def _version() -> str:
    from mimkit import __version__

    return __version__


def _header(method: str, cfg: dict) -> dict[str, str]:
    return {"format": "pt", "mimkit": json.dumps({"method": method, "model": cfg, "version": _version()})}


def _save_safetensors(state: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # safetensors stores each tensor once: make every one contiguous and unshared.
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path), metadata=metadata)


# --------------------------------------------------------------------------- Hugging Face names and configs


def mae_to_hf(state: Mapping[str, Tensor], prefix: str = "vit.", legacy: bool = False) -> dict[str, Tensor]:
    """mimkit state dict -> Hugging Face ViT / ViTMAE names, qkv split into q, k, v.

    `prefix` is `"vit."` for ViTMAEForPreTraining and ViTForImageClassification, `""` for ViTModel
    and ViTMAEModel. `legacy=False` gives the names of transformers 5 models in memory (for
    `load_state_dict`); `legacy=True` the 4.x hub names, which both 4.x and 5.x `from_pretrained`
    read (what `mimkit export --to hf` writes). `head` becomes `classifier`. `fc_norm` (average
    pooling) and LayerScale have no Hugging Face ViT counterpart and raise.
    """
    block_names = BLOCK_TO_HF_LEGACY if legacy else BLOCK_TO_HF
    out = {}
    for key, value in state.items():
        stem, leaf = split_suffix(key)
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)$", stem)
        if m:
            stack = ("encoder.layer" if legacy else "layers") if m[1] == "blocks" else "decoder.decoder_layers"
            base = f"{prefix}{stack}.{m[2]}" if m[1] == "blocks" else f"{stack}.{m[2]}"
            if m[3] == "attn.qkv":
                for n, part in zip("qkv", value.chunk(3, dim=0)):
                    out[join_key(f"{base}.{block_names['attn.' + n]}", leaf)] = part.clone()
            elif m[3] in block_names:
                out[join_key(f"{base}.{block_names[m[3]]}", leaf)] = value
            else:
                raise WeightsError(f"{key} has no Hugging Face ViT counterpart (LayerScale and other "
                                   "additions to the plain ViT block cannot be exported to transformers' ViT)")
        elif stem in ENCODER_TO_HF:
            out[join_key(prefix + ENCODER_TO_HF[stem], leaf)] = value
        elif stem in OUTSIDE_TO_HF:
            out[join_key(OUTSIDE_TO_HF[stem], leaf)] = value
        elif stem == "fc_norm":
            raise WeightsError("fc_norm (average pooling, as in MAE fine-tuning) has no Hugging Face ViT "
                               "counterpart: transformers' ViT classifies the cls token after the final norm")
        else:
            raise WeightsError(f"{key} has no Hugging Face ViT counterpart")
    return out


def hf_config_from_mae(cfg) -> dict:
    """`ViTMAEConfig` keyword arguments equivalent to a mimkit `MAEConfig` (LayerNorm eps 1e-6 as in MAE)."""
    return dict(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), hidden_act="gelu", qkv_bias=True,
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
        decoder_hidden_size=cfg.decoder_embed_dim, decoder_num_hidden_layers=cfg.decoder_depth,
        decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio),
        mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss, layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def hf_config_from_vit(cfg: Mapping) -> dict:
    """`ViTConfig` keyword arguments equivalent to a mimkit ViT config (see `vit_fields`)."""
    out = dict(
        hidden_size=cfg["embed_dim"], num_hidden_layers=cfg["depth"], num_attention_heads=cfg["num_heads"],
        intermediate_size=int(cfg["embed_dim"] * cfg["mlp_ratio"]), hidden_act="gelu",
        qkv_bias=cfg["qkv_bias"], image_size=cfg["img_size"], patch_size=cfg["patch_size"],
        num_channels=cfg["in_chans"], encoder_stride=cfg["patch_size"], layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    if cfg["num_classes"]:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg["num_classes"])}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg["num_classes"])}
    return out


# --------------------------------------------------------------------------- writers


def _torch_save(obj: object, path: Path) -> None:
    with open(path, "wb") as f:  # opened here: a refused open is an OSError, not torch's RuntimeError
        torch.save(obj, f)


def timm_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The encoder's weights under timm's `VisionTransformer` names (see the module docstring).

    BEiT-style query and value biases without a key bias (CAE's `attn.q_bias`, `attn.v_bias`), which
    timm's ViT does not have, become the equivalent fused `attn.qkv.bias` = [q_bias, 0, v_bias]."""
    source = encoder_of(model).state_dict()
    state = {}
    for key, value in source.items():
        if key.endswith((".attn.q_bias", ".attn.v_bias")):
            continue
        state[key] = value
        q_bias = key.replace("qkv.weight", "q_bias")
        if key.endswith(".attn.qkv.weight") and q_bias in source:
            q, v = source[q_bias], source[key.replace("qkv.weight", "v_bias")]
            state[key.replace("weight", "bias")] = torch.cat([q, torch.zeros_like(q), v])
    return state


TIMM_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def timm_config(cfg: Mapping, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """config.json of a timm `local-dir:` folder for a mimkit ViT config: a registered architecture
    name, `model_args` that rebuild exactly this encoder, and the `pretrained_cfg` timm's data
    pipeline reads (input size, bicubic, mean, std, MAE's evaluation crop_pct 224 / 256)."""
    args = dict(img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
                embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
                qkv_bias=bool(cfg["qkv_bias"] or cfg.get("qv_bias")), init_values=cfg["init_values"] or None,
                num_classes=cfg["num_classes"], global_pool=cfg["global_pool"], class_token=True)
    height, width = size_pair(cfg["img_size"])
    return {"architecture": "vit_base_patch16_224", "num_classes": cfg["num_classes"], "model_args": args,
            "pretrained_cfg": {"tag": "mimkit", "input_size": [cfg["in_chans"], height, width],
                               "fixed_input_size": True,
                               "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
                               "mean": list(mean), "std": list(std), "num_classes": cfg["num_classes"],
                               "first_conv": "patch_embed.proj", "classifier": "head"}}


def save_timm(model: nn.Module, path: str | Path, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Path:
    """timm state dict: torch.save of the bare dict, or safetensors (with the `mimkit` header) by suffix;
    a path without one of `TIMM_FILE_SUFFIXES` becomes a folder for `timm.create_model("local-dir:PATH",
    pretrained=True)`: config.json (`timm_config`, with the normalisation `mean`, `std`) + model.safetensors."""
    path = Path(path)
    encoder = encoder_of(model)  # built once: timm_state_dict takes a bare encoder as it is
    state = timm_state_dict(encoder)
    method, cfg = architecture_of(encoder)
    if cfg.pop("qv_bias", False):  # folded into qkv.bias: the file holds a plain ViT
        cfg["qkv_bias"] = True
    if path.suffix not in TIMM_FILE_SUFFIXES:
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(timm_config(cfg, mean, std), indent=2) + "\n")
        _save_safetensors(state, path / "model.safetensors", _header(method, cfg))
    elif path.suffix == ".safetensors":
        _save_safetensors(state, path, _header(method, cfg))
    else:
        _torch_save(state, path)
    return path


def save_official(model: nn.Module, path: str | Path) -> Path:
    """Official MAE layout `{"model": state}` plus `method` and `config` (see the module docstring)."""
    method, cfg = architecture_of(model)
    path = Path(path)
    _torch_save({"model": model.state_dict(), "method": method, "config": {"model": cfg}, "version": _version()},
                path)
    return path


def save_safetensors(model: nn.Module, path: str | Path) -> Path:
    """All weights as safetensors, with the architecture in the header's `mimkit` entry."""
    path = Path(path)
    _save_safetensors(model.state_dict(), path, _header(*architecture_of(model)))
    return path


def hf_architecture(model: nn.Module) -> str:
    """The transformers class `save_hf` writes `model` as."""
    method, cfg = architecture_of(model)
    if method == "mae":
        return "ViTMAEForPreTraining"
    if method != "vit":
        return "ViTModel"  # other methods go to transformers as their encoder
    return "ViTForImageClassification" if cfg["num_classes"] else "ViTModel"


def save_hf(model: nn.Module, directory: str | Path, card: str | None = None) -> Path:
    """A Hugging Face model directory: config.json + model.safetensors (see the module docstring), and
    the model card `card` as README.md when given (`mimkit.hub.model_card`)."""
    method, cfg = architecture_of(model)
    if method not in ("mae", "vit"):  # other methods (CAE) go to transformers as their encoder
        model = encoder_of(model)
        method, cfg = architecture_of(model)
    arch = hf_architecture(model)
    prefix = "" if arch == "ViTModel" else "vit."
    if method == "mae":
        if model.img_size[0] != model.img_size[1]:
            raise WeightsError(f"transformers' ViTMAE builds square patch grids only (its sin-cos positions use "
                               f"sqrt(num_patches)); this model is {model.img_size[0]} x {model.img_size[1]}. Export "
                               "the encoder as a ViTModel (--encoder-only), or the whole model --to official or "
                               "safetensors.")
        config = {"model_type": "vit_mae", **hf_config_from_mae(model.cfg)}
    else:
        if cfg["global_pool"] != "token":
            raise WeightsError("this model pools by averaging the patch tokens through fc_norm (MAE fine-tuning); "
                               "transformers' ViTModel / ViTForImageClassification only use the cls token after "
                               "the final norm, so it cannot be exported to Hugging Face exactly. Export it with "
                               "--to timm, official or safetensors.")
        if cfg["init_values"]:
            raise WeightsError("this model uses LayerScale (ls1/ls2), which transformers' ViT does not have; "
                               "export it with --to timm, official or safetensors.")
        config = {"model_type": "vit", **hf_config_from_vit(cfg)}
    config = {"architectures": [arch], **config, "dtype": str(model.cls_token.dtype).removeprefix("torch.")}
    state = mae_to_hf(model.state_dict(), prefix=prefix, legacy=True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _save_safetensors(state, directory / "model.safetensors", {"format": "pt"})
    if card is not None:
        (directory / "README.md").write_text(card)
    return directory


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(path: Path) -> None:
    for file in (sorted(path.iterdir()) if path.is_dir() else [path]):
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def write_new(out: str | Path, write: Callable[[Path], object], overwrite: bool = False) -> Path:
    """Run `write(tmp)` (which writes a file or a directory at `tmp`) and rename the result to `out`:
    refused when `out` exists unless `overwrite`; on a failure nothing is left and the `WeightsError`
    names `out` and the OS's reason."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise WeightsError(f"{out} exists: pass --overwrite (overwrite=True) to replace it")
    tmp, old = out.with_name(f".tmp-{out.name}"), out.with_name(f".old-{out.name}")  # suffix kept
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        write(tmp)
        _fsync_tree(tmp)
        if out.exists() or out.is_symlink():
            _remove(old)
            os.replace(out, old)  # a directory cannot be renamed over, so the old one steps aside
        os.replace(tmp, out)
        fsync_dir(out.parent)
        _remove(old)
    except Exception as e:
        cause = os_error(e)
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
        if old.exists() and not out.exists():
            os.replace(old, out)
        if cause is None:
            raise
        raise WeightsError(f"cannot write {out}: {os_reason(cause)}") from None
    return out


class _Features(nn.Module):
    """What an ONNX export computes: `pooled_features` of the encoder, (B, 3, H, W) -> (B, D) or (B, N, D)."""

    def __init__(self, encoder: nn.Module, pool: str):
        super().__init__()
        self.encoder, self.pool = encoder, pool

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.encoder.pooled_features(pixel_values, self.pool)


def save_onnx(model: nn.Module, path: str | Path, pool: str = "cls") -> Path:
    """The encoder's feature extractor (`pool`: cls, mean or tokens) as an ONNX graph with a dynamic
    batch: input `pixel_values` (B, 3, S, S) normalised as for training, output `features`; the
    architecture, pool and mimkit version are in the model's metadata. Needs `pip install mimkit[onnx]`."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as e:
        raise WeightsError(f"--to onnx needs the onnx extra: pip install 'mimkit[onnx]' ({e})") from None
    encoder = encoder_of(model).eval()
    size = sum(v.numel() * v.element_size() for v in encoder.state_dict().values())
    if size > ONNX_MAX_BYTES:
        raise WeightsError(f"the encoder's weights are {size / 2**30:.2f} GiB, more than one ONNX file holds "
                           f"({ONNX_MAX_BYTES / 2**30:.1f} GiB, protobuf's limit); export a smaller model or --to timm")
    example = torch.zeros(2, encoder.in_chans, *encoder.img_size, device=encoder.cls_token.device)
    batch = {"pixel_values": {0: torch.export.Dim("batch")}}
    quiet = logging.getLogger("torch.onnx")  # it warns about torchvision's operators, which a ViT does not use
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(_Features(encoder, pool).eval(), (example,), input_names=["pixel_values"],
                                        output_names=["features"], dynamic_shapes=batch, dynamo=True, verbose=False)
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    method, cfg = architecture_of(encoder)
    for key, value in (("mimkit", json.dumps({"method": method, "model": cfg, "pool": pool, "version": _version()})),
                       ("pool", pool)):
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, key: value})
    onnx.save(proto, str(path))
    return Path(path)




def export(model: nn.Module, out: str | Path, to: str, img_size: int | tuple[int, int] | None = None,
           encoder_only: bool = False, overwrite: bool = False, pool: str = "cls",
           mean=IMAGENET_MEAN, std=IMAGENET_STD, card: str | None = None) -> Path:
    """Write `model` to `out` as `to` (one of `TARGETS`); returns the path written.

    `img_size` resamples the position embeddings (bicubic) to that resolution first;
    `encoder_only` drops the decoder (for `official`, `hf` and `safetensors`; `timm` and `onnx` always
    do); `pool` is what an `onnx` graph outputs; `mean` and `std` (the training normalisation) go into
    a timm folder's config; `card` becomes an `hf` folder's README.md; an existing `out` is replaced only
    with `overwrite` (see the module docstring).
    """
    writers = {"timm": partial(save_timm, mean=mean, std=std), "official": save_official,
               "hf": partial(save_hf, card=card), "safetensors": save_safetensors,
               "onnx": partial(save_onnx, pool=pool)}  # the keys are TARGETS
    if to not in writers:
        raise WeightsError(f"unknown export target {to!r} (known: {', '.join(TARGETS)})")
    if img_size is not None:
        model = with_img_size(model, img_size)
    if encoder_only:
        model = encoder_of(model)
    return write_new(out, lambda tmp: writers[to](model, tmp), overwrite)
