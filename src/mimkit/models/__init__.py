"""Methods: one model file each, registered in one line of `METHODS`."""

from __future__ import annotations

import dataclasses
import difflib

from torch import nn

from mimkit.config import Config, ConfigError, from_dict, to_dict
from mimkit.models.cae import CAE, CAEConfig
from mimkit.models.cae import PRESETS as CAE_PRESETS
from mimkit.models.mae import MAE, MAEConfig
from mimkit.models.mae import PRESETS as MAE_PRESETS

# method -> (config class, model class, presets)
METHODS = {"mae": (MAEConfig, MAE, MAE_PRESETS), "cae": (CAEConfig, CAE, CAE_PRESETS)}


def resolve_model_config(method: str, model: dict):
    """Typed model config from a `model:` section: the preset's fields, then the explicit ones."""
    if method not in METHODS:
        close = difflib.get_close_matches(method, list(METHODS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"method: unknown method {method!r}{hint} (known: {', '.join(METHODS)})")
    cfg_cls, _, presets = METHODS[method]
    preset = model.get("preset", "")
    if preset and preset not in presets:
        close = difflib.get_close_matches(str(preset), list(presets), n=1)
        hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(presets)}"
        raise ConfigError(f"model.preset: unknown preset {preset!r}; {hint}")
    return from_dict(cfg_cls, {**presets.get(preset, {}), **model}, prefix="model.")


def build_model(method: str = "mae", model: dict | None = None, **overrides) -> nn.Module:
    """Build a method's model: `build_model("mae", {"preset": "mae_vit_base_patch16"})` or with keywords."""
    cfg = resolve_model_config(method, {**(model or {}), **overrides})
    return METHODS[method][1](cfg)


def resolved_config(cfg: Config) -> dict:
    """The full configuration as plain data, with the model section expanded from its preset."""
    out = to_dict(cfg)
    out["model"] = dataclasses.asdict(resolve_model_config(cfg.method, cfg.model))
    return out
