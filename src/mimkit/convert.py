"""Weights in and out: key maps between mimkit (timm / official MAE names) and other formats.

mimkit's own names are those of the official `models_mae.py` and timm, so an official MAE
state dict needs no renaming, only unwrapping. Hugging Face's ViTMAE uses separate q/k/v
projections: a fused qkv is split by rows (`[:D]`, `[D:2D]`, `[2D:]`). Every load goes through
`check_state_dict`, which compares every key and shape and names what does not fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

# Per-block names: mimkit -> transformers >= 5 ViTMAE.
_BLOCK_TO_HF = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# transformers 4.x names of the same tensors (hub checkpoints such as facebook/vit-mae-base).
_BLOCK_FROM_HF_LEGACY = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.attention.query": "attn.q",
    "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v",
}
_TOP_TO_HF = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj": "vit.embeddings.patch_embeddings.projection",
    "norm": "vit.layernorm",
    "decoder_embed": "decoder.decoder_embed",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm": "decoder.decoder_norm",
    "decoder_pred": "decoder.decoder_pred",
}
_STACKS = {"blocks": "vit.layers", "decoder_blocks": "decoder.decoder_layers"}
_STACKS_LEGACY = {"vit.encoder.layer": "blocks", "decoder.decoder_layers": "decoder_blocks"}


class WeightsError(ValueError):
    """Weights that do not fit: the message lists the offending keys."""


def _split_suffix(key: str) -> tuple[str, str]:
    stem, _, leaf = key.rpartition(".")
    return (stem, leaf) if leaf in ("weight", "bias") else (key, "")


def _join(stem: str, leaf: str) -> str:
    return f"{stem}.{leaf}" if leaf else stem


def mae_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """mimkit / official MAE state dict -> transformers `ViTMAEForPreTraining` state dict."""
    out = {}
    for key, value in state.items():
        stem, leaf = _split_suffix(key)
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)$", stem)
        if m:
            prefix = f"{_STACKS[m[1]]}.{m[2]}"
            if m[3] == "attn.qkv":
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}.attention.{name}.{leaf}"] = part.clone()
                continue
            if m[3] not in _BLOCK_TO_HF:
                raise WeightsError(f"no Hugging Face name for {key}")
            out[_join(f"{prefix}.{_BLOCK_TO_HF[m[3]]}", leaf)] = value
        elif stem in _TOP_TO_HF:
            out[_join(_TOP_TO_HF[stem], leaf)] = value
        else:
            raise WeightsError(f"no Hugging Face name for {key}")
    return out


def hf_to_mae(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers ViTMAE state dict (5.x names, or 4.x hub names) -> mimkit names, q/k/v fused."""
    top = {v: k for k, v in _TOP_TO_HF.items()}
    block = {v: k for k, v in _BLOCK_TO_HF.items()}
    block.update({f"attention.{n}_proj": f"attn.{n}" for n in "qkv"}, **_BLOCK_FROM_HF_LEGACY)
    stacks = {v: k for k, v in _STACKS.items()} | _STACKS_LEGACY
    out, unknown = {}, []
    for key, value in state.items():
        stem, leaf = _split_suffix(key)
        m = re.match(r"^(vit\.layers|vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)$", stem)
        if m and m[3] in block:
            out[_join(f"{stacks[m[1]]}.{m[2]}.{block[m[3]]}", leaf)] = value
        elif stem in top:
            out[_join(top[stem], leaf)] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"unknown ViTMAE keys: {', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else ""))
    # Fuse attn.q / attn.k / attn.v back into attn.qkv (rows q, then k, then v).
    for key in [k for k in out if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
        base, leaf = key.rsplit(".attn.q.", 1)
        parts = [out.pop(f"{base}.attn.{n}.{leaf}") for n in "qkv"]
        out[f"{base}.attn.qkv.{leaf}"] = torch.cat(parts, dim=0)
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


def mae_config_from_hf(hf: Mapping) -> dict:
    """A mimkit `model:` section from a ViTMAE `config.json` dict."""
    # The hub configs say layer_norm_eps 1e-12, but MAE's weights were trained with 1e-6, which
    # mimkit always uses.
    return dict(
        img_size=hf["image_size"], patch_size=hf["patch_size"], in_chans=hf.get("num_channels", 3),
        embed_dim=hf["hidden_size"], depth=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        mlp_ratio=hf["intermediate_size"] / hf["hidden_size"], decoder_embed_dim=hf["decoder_hidden_size"],
        decoder_depth=hf["decoder_num_hidden_layers"], decoder_num_heads=hf["decoder_num_attention_heads"],
        mask_ratio=hf.get("mask_ratio", 0.75), norm_pix_loss=bool(hf.get("norm_pix_loss", False)),
    )


def unwrap_official(obj: Mapping) -> dict[str, Tensor]:
    """An official facebookresearch/mae checkpoint (`{"model": state}` or the bare state) -> state dict.

    Also strips the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes that wrapped saves leave.
    """
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError("not a state dict: expected a mapping of names to tensors (or one under 'model')")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], what: str = "weights") -> None:
    """Raise a `WeightsError` listing missing, unexpected and wrongly shaped keys, if any."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{label}: {', '.join(items[:8])}" + (" ..." if len(items) > 8 else "")
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                if items]
    if problems:
        raise WeightsError(f"{what} do not fit {type(model).__name__}: " + "; ".join(problems))


def load_checked(model: nn.Module, state: Mapping[str, Tensor], what: str = "weights") -> nn.Module:
    """`check_state_dict`, then a strict load."""
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True)
    return model



def read_file(path: str | Path) -> object:
    """Whatever a `.pt`/`.pth`/`.bin` (torch.save) or `.safetensors` file holds, loaded on the CPU;
    a missing or unreadable file raises a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated archive, pickle error, header error, ...
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None


def read_state(source: str | Path | Mapping) -> dict[str, Tensor]:
    """A state dict from a file (official `{"model": ...}` or bare, a mimkit checkpoint, safetensors)
    or a mapping; Hugging Face ViTMAE names are mapped to mimkit's."""
    state = unwrap_official(source if isinstance(source, Mapping) else read_file(source))
    if any(k.startswith(("vit.", "decoder.decoder_")) for k in state):
        state = hf_to_mae(state)
    return state


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A model from a mimkit checkpoint, built from the config stored in it, in eval mode."""
    from mimkit.models import build_model  # models import config only; keep convert importable alone

    state = read_file(path)
    if not isinstance(state, Mapping) or not {"model", "config", "method"} <= state.keys():
        raise WeightsError(f"{path}: not a mimkit checkpoint (it needs 'model', 'config' and 'method' entries)")
    model = build_model(state["method"], state["config"]["model"])
    return load_checked(model, state["model"], f"checkpoint {path}").to(device).eval()
