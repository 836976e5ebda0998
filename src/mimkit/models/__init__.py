"""Methods: one model file each, registered in one line of `METHODS`."""

from __future__ import annotations

import dataclasses
import difflib

from torch import nn

from mimkit.config import Config, ConfigError, from_dict, to_dict
from mimkit.models.cae import CAE, CAEConfig
from mimkit.models.cae import PRESETS as CAE_PRESETS
from mimkit.models.data2vec2 import PRESETS as DATA2VEC2_PRESETS
from mimkit.models.data2vec2 import Data2Vec2, Data2Vec2Config
from mimkit.models.ijepa import IJEPA, IJEPAConfig
from mimkit.models.ijepa import PRESETS as IJEPA_PRESETS
from mimkit.models.mae import MAE, MAEConfig
from mimkit.models.mae import PRESETS as MAE_PRESETS
from mimkit.models.simmim import PRESETS as SIMMIM_PRESETS
from mimkit.models.simmim import SimMIM, SimMIMConfig

# method -> (config class, model class, presets)
METHODS = {"mae": (MAEConfig, MAE, MAE_PRESETS), "cae": (CAEConfig, CAE, CAE_PRESETS),
           "simmim": (SimMIMConfig, SimMIM, SIMMIM_PRESETS), "ijepa": (IJEPAConfig, IJEPA, IJEPA_PRESETS),
           "data2vec2": (Data2Vec2Config, Data2Vec2, DATA2VEC2_PRESETS)}


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


# Model fields that restate the data section: CAE un-normalises images with data.mean / data.std
# before tokenizing them, so they are taken from there, never set apart.
TIED_TO_DATA = {"image_mean": "mean", "image_std": "std"}


def model_config_of(cfg: Config):
    """The typed model config of a run: its model section over the preset, with the fields of
    `TIED_TO_DATA` taken from the data section (given in the model section too, they must agree)."""
    model = dict(cfg.model)
    if cfg.method in METHODS:
        fields = {f.name for f in dataclasses.fields(METHODS[cfg.method][0])}
        for key, data_key in TIED_TO_DATA.items():
            if key not in fields:
                continue
            value = list(getattr(cfg.data, data_key))
            if key in model and list(model[key]) != value:
                raise ConfigError(f"model.{key}: {list(model[key])} differs from data.{data_key} {value}; it is "
                                  f"the normalisation the data pipeline applies: set data.{data_key} only")
            model[key] = value
    return resolve_model_config(cfg.method, model)


def resolved_config(cfg: Config, model_cfg=None) -> dict:
    """The full configuration as plain data, with the model section expanded from its preset (or
    `model_cfg`, the run's `model_config_of(cfg)`, already resolved)."""
    out = to_dict(cfg)
    out["model"] = to_dict(model_cfg if model_cfg is not None else model_config_of(cfg))
    return out
