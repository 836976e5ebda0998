"""Architectures: what a model is, read off its weights or its record, built, described, carved and resized.

Every model is a `VisionTransformer` (MAE and CAE extend it) whose constructor arguments are its
record, `model.arch`; a method's model adds its config dataclass, `model.cfg`. `architecture_of`
gives `(method, config)` that `build_architecture` turns back into such a model; a bare encoder is
method "vit". `infer_architecture` reads the same off a state dict, for files that do not store it.
`encoder_of` carves the encoder out of any model; `with_img_size` resizes a model to another
resolution (position embeddings resampled bicubically).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Mapping

from torch import Tensor, nn

from mimkit.config import ConfigError, size_pair
from mimkit.serialization import WeightsError


def shorten(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------
# Architecture: read off the weights, build, describe
# ---------------------------------------------------------------------------------------------

# Attention heads of the standard widths (ViT paper; DeiT for 192 and 384): the one thing the
# weights do not say. MAE's decoders: 512 wide, 16 heads (`models_mae.py`, HF ViTMAEConfig).
HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DECODER_HEADS = {512: 16}
# A bare encoder is method "vit": a `VisionTransformer` built from its keyword arguments (`vit_fields`).
POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")  # (1, 1 + N, D): one cls row, then the grid


def vit_fields() -> tuple[str, ...]:
    """The keyword arguments of `VisionTransformer`: the model config of method "vit"."""
    from mimkit.models.vit import VisionTransformer

    return tuple(inspect.signature(VisionTransformer).parameters)


def method_fields(method: str) -> tuple[str, ...]:
    """The model-config fields of a method ("vit" for a bare `VisionTransformer`)."""
    if method == "vit":
        return vit_fields()
    from mimkit.models import METHODS, resolve_model_config

    resolve_model_config(method, {})  # unknown method -> ConfigError naming the known ones
    return tuple(f.name for f in dataclasses.fields(METHODS[method][0]))


def _depth(state: Mapping[str, Tensor], stack: str, where: str) -> int:
    ids = sorted({int(m[1]) for k in state if (m := re.match(rf"^{stack}\.(\d+)\.", k))})
    if ids != list(range(len(ids))):
        gaps = sorted(set(range(max(ids) + 1)) - set(ids))
        raise WeightsError(f"{where}: {stack} {', '.join(map(str, gaps))} missing (found {len(ids)} of "
                           f"{max(ids) + 1}); the file is incomplete")
    return len(ids)


def _grid(pos: Tensor, key: str, where: str) -> int:
    n = pos.shape[1] - 1 if pos.ndim == 3 else 0
    if n < 1 or math.isqrt(n) ** 2 != n:
        raise WeightsError(f"{where}: {key} of shape {tuple(pos.shape)} is not (1, 1 + n*n, D)")
    return math.isqrt(n)


def infer_architecture(state: Mapping[str, Tensor], given: Mapping | None = None,
                       where: str = "weights") -> tuple[str, dict]:
    """(method, model config) of a state dict in mimkit names, read off the weights.

    Sizes come from the tensors; heads from `given` (config.json or the caller) else `HEADS` /
    `DECODER_HEADS`. With a decoder it is an "mae", else a "vit" (`VisionTransformer`), whose
    classifier (`head`) and pooling (`fc_norm` without `norm`: average, MAE fine-tuning) are read
    too. `given` fields that the method does not have are ignored.
    """
    given = dict(given or {})
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        missing = [k for k in ("patch_embed.proj.weight", "pos_embed") if k not in state]
        raise WeightsError(f"{where}: not a Vision Transformer: no {' or '.join(missing)} among "
                           f"{shorten(sorted(state), 5)}")
    D, C, p, _ = state["patch_embed.proj.weight"].shape
    depth = _depth(state, "blocks", where)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    grid = grid_of(state, given)
    if grid is not None and grid[0] * grid[1] != state["pos_embed"].shape[1] - 1:
        raise WeightsError(f"{where}: pos_embed of shape {tuple(state['pos_embed'].shape)} does not fit img_size "
                           f"{given['img_size']} with patch {p}")
    img = given["img_size"] if grid is not None else _grid(state["pos_embed"], "pos_embed", where) * p
    cfg = dict(img_size=img, patch_size=p, in_chans=C, embed_dim=D,
               depth=depth, num_heads=HEADS.get(D), mlp_ratio=fc1.shape[0] / D if fc1 is not None else 4.0)
    if "decoder_embed.weight" in state:
        method = "mae"
        Dd = state["decoder_embed.weight"].shape[0]
        cfg |= dict(decoder_embed_dim=Dd, decoder_depth=_depth(state, "decoder_blocks", where),
                    decoder_num_heads=DECODER_HEADS.get(Dd))
        dfc1 = state.get("decoder_blocks.0.mlp.fc1.weight")
        if dfc1 is not None and dfc1.shape[0] / Dd != cfg["mlp_ratio"]:
            raise WeightsError(f"{where}: decoder MLP ratio {dfc1.shape[0] / Dd} differs from the encoder's "
                               f"{cfg['mlp_ratio']}; mimkit's MAE uses one ratio for both")
    else:
        method = "vit"
        head = state.get("head.weight")
        cfg |= dict(qkv_bias="blocks.0.attn.qkv.bias" in state or depth == 0, drop_path_rate=0.0,
                    # any non-zero value: the trained LayerScale gammas are loaded over it
                    init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
                    num_classes=head.shape[0] if head is not None else 0,
                    global_pool="avg" if "fc_norm.weight" in state and "norm.weight" not in state else "token")
        if "blocks.0.attn.q_bias" in state:  # BEiT-style q and v biases, no k bias (CAE)
            cfg |= dict(qv_bias=True, qkv_bias=False)
    fields = method_fields(method)
    cfg |= {k: v for k, v in given.items() if k in fields}
    for key, part, width, table in (("num_heads", "encoder", D, HEADS),
                                    ("decoder_num_heads", "decoder", cfg.get("decoder_embed_dim"), DECODER_HEADS)):
        if key in cfg and cfg[key] is None:
            known = ", ".join(f"{w}: {h}" for w, h in table.items())
            raise WeightsError(f"{where}: the weights do not say how many attention heads the {width}-wide {part} "
                               f"has (standard widths: {known}); pass {key}=... (command line: "
                               f"--{key.replace('_', '-')})")
    return method, cfg


def build_architecture(method: str, cfg: Mapping) -> nn.Module:
    """A freshly initialised model: a `VisionTransformer` for "vit", else `build_model(method, cfg)`."""
    from mimkit.models import build_model
    from mimkit.models.vit import VisionTransformer

    if method != "vit":
        return build_model(method, dict(cfg))
    fields = vit_fields()
    unknown = sorted(set(cfg) - set(fields))
    if unknown:
        raise ConfigError(f"vit: unknown option(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    return VisionTransformer(**cfg)


def architecture_of(model: nn.Module) -> tuple[str, dict]:
    """(method, model config) that `build_architecture` turns back into a model like `model`: a method's
    model by its `cfg`, a bare encoder ("vit") by its record `arch`."""
    from mimkit.models import METHODS
    from mimkit.models.vit import VisionTransformer

    for method, (_, cls, _) in METHODS.items():
        if type(model) is cls:
            return method, dataclasses.asdict(model.cfg)
    if type(model) is not VisionTransformer:
        raise WeightsError(f"cannot describe a {type(model).__name__}: expected a VisionTransformer or a model of "
                           "mimkit.models.METHODS")
    return "vit", dict(model.arch)


def describe(method: str, cfg: Mapping) -> str:
    """One line: `mae ViT 768x12 (12 heads), patch 16, 224 px, decoder 512x8`."""
    img = cfg.get("img_size")
    img = "x".join(map(str, img)) if isinstance(img, (list, tuple)) else img
    s = (f"{method} ViT {cfg.get('embed_dim')}x{cfg.get('depth')} ({cfg.get('num_heads')} heads), "
         f"patch {cfg.get('patch_size')}, {img} px")
    if cfg.get("in_chans", 3) != 3:
        s += f", {cfg['in_chans']} channels"
    if cfg.get("decoder_embed_dim"):
        s += f", decoder {cfg['decoder_embed_dim']}x{cfg['decoder_depth']}"
    if cfg.get("num_classes"):
        s += f", {cfg['num_classes']} classes ({cfg.get('global_pool')} pooling)"
    return s


# ---------------------------------------------------------------------------------------------
# Position embeddings, checks and loading
# ---------------------------------------------------------------------------------------------


def fit_pos_embed(state: Mapping[str, Tensor], grid: tuple[int, int],
                  source: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """Resize every (1, 1 + h*w, D) position embedding in `state`, of the `source` grid (None: a square
    one), to a grid of h' x w' patches, bicubic, keeping the cls row (`resample_pos_embed`, as MAE's
    `interpolate_pos_embed` and timm). Same grid: unchanged."""
    from mimkit.models.vit import resample_pos_embed

    out = dict(state)
    for key in POS_EMBED_KEYS:
        if key not in out or out[key].ndim != 3:
            continue
        src = source or (_grid(out[key], key, "weights"),) * 2
        if tuple(src) != tuple(grid):
            if src[0] * src[1] != out[key].shape[1] - 1:
                raise WeightsError(f"weights: {key} of shape {tuple(out[key].shape)} is not a {src[0]} x {src[1]} "
                                   "grid of patches plus a cls row")
            out[key] = resample_pos_embed(out[key], grid, source=src)
    return out


def grid_of(state: Mapping[str, Tensor], config: Mapping) -> tuple[int, int] | None:
    """(h, w) patches the weights were made for, when their `config` states img_size (a rectangle is
    not read off a position embedding); else None (a square grid, read off `pos_embed`)."""
    weight = state.get("patch_embed.proj.weight")
    if config.get("img_size") is None or weight is None:
        return None
    return target_grid({"img_size": config["img_size"], "patch_size": weight.shape[-1]})


def target_grid(cfg: Mapping) -> tuple[int, int] | None:
    """(h, w) patches of a model config (None when it lacks img_size or patch_size)."""
    img, patch = cfg.get("img_size"), cfg.get("patch_size")
    if img is None or patch is None:
        return None
    h, w = size_pair(img)
    if h % patch or w % patch:
        raise ConfigError(f"img_size {img} is not a multiple of the patch size {patch}")
    return h // patch, w // patch


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], what: str = "weights") -> None:
    """Raise a `WeightsError` listing missing, unexpected and wrongly shaped keys, if any."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{label}: {shorten(items)}"
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("shape mismatch (file vs model)", shapes)) if items]
    if problems:
        raise WeightsError(f"{what} do not fit the {type(model).__name__}: " + "; ".join(problems) +
                           ". The file is incomplete or holds another architecture than this model.")


def load_checked(model: nn.Module, state: Mapping[str, Tensor], what: str = "weights") -> nn.Module:
    """`check_state_dict`, then a strict load."""
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True)
    return model



def with_img_size(model: nn.Module, img_size: int | tuple[int, int]) -> nn.Module:
    """A copy of `model` for `img_size` pixels (a side or (H, W)), position embeddings resampled (bicubic);
    same size: `model`."""
    if size_pair(img_size) == model.img_size:
        return model
    method, cfg = architecture_of(model)
    cfg = dict(cfg, img_size=img_size)
    state = fit_pos_embed(model.state_dict(), target_grid(cfg), model.patch_embed.grid_size)
    new = load_checked(build_architecture(method, cfg), state, "resampled weights")
    return new.to(model.cls_token.device).train(model.training)


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder alone as a `VisionTransformer` (timm layout): `model` itself if it is one, else one
    built from the model's record `arch` holding `model.encoder_state_dict()` (MAE, CAE, any method)."""
    from mimkit.models.vit import VisionTransformer

    if type(model) is VisionTransformer:
        return model
    if not hasattr(model, "encoder_state_dict"):
        raise WeightsError(f"{type(model).__name__} has no encoder_state_dict(): cannot separate its encoder")
    encoder = load_checked(VisionTransformer(**model.arch), model.encoder_state_dict(), "encoder weights")
    return encoder.to(model.cls_token.device).train(model.training)
