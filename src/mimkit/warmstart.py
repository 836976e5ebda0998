"""Start pretraining from released weights (`init=PATH`): domain-adaptive pretraining.

Any weights `mimkit.load` reads (official MAE `mae_pretrain_*` / `mae_visualize_*`, official CAE,
Hugging Face ViTMAE / ViT directories, timm, mimkit checkpoints and exports) initialise a freshly
built pretraining model: every parameter the file holds under the model's name is taken, position
embeddings resampled to the recipe's grid; what the file lacks (the decoder of an encoder-only file,
CAE's regressor from an MAE file) keeps the method's initialisation. Position embeddings, also fixed
sin-cos ones, are the file's (a source's loss is reproduced exactly), resampled bicubically when the
grid differs, as for evaluation. The architecture must agree: a
different width, depth, head count or patch size is a one-line error naming both values; RGB weights
start a model of another channel count with their patch embedding adapted (`adapt_in_chans`). The
optimizer and schedule start afresh: this is not a resume. A method's EMA teacher (I-JEPA, data2vec
2.0) that the file lacks starts as a copy of the loaded encoder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from torch import Tensor, nn

from mimkit.architecture import architecture_of, fit_pos_embed, infer_architecture, shorten, target_grid
from mimkit.config import ConfigError
from mimkit.convert import read_weights
from mimkit.hub import is_hub

log = logging.getLogger("mimkit")

ENCODER_SHAPE = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
PART_SHAPE = ("_embed_dim", "_depth", "_num_heads")  # decoder_*, regressor_*: checked when both have the part


def _parts(keys) -> list[str]:
    """Top-level module names of state-dict keys, in order (`decoder_blocks`, `mask_token`, ...)."""
    return list(dict.fromkeys(k.split(".")[0] for k in keys))


def adapt_in_chans(weight: Tensor, in_chans: int) -> Tensor:
    """An RGB patch-embedding kernel (D, 3, p, p) for `in_chans` channels, as timm's `adapt_input_conv`:
    for one channel the sum of the three filters (grey = R + G + B responds as the colour filters did);
    for more, the RGB filters repeated over the channels and scaled by 3 / in_chans."""
    if weight.shape[1] != 3:
        raise ConfigError(f"init: only RGB patch embeddings are adapted to other channel counts, got "
                          f"{weight.shape[1]} channels")
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / in_chans)


def init_from(model: nn.Module, source: str | Path) -> dict:
    """Load the weights at `source` into the freshly initialised pretraining `model` (see the module
    docstring), in place. Returns what was taken and what kept its initialisation."""
    if not is_hub(source) and not Path(source).exists():
        raise ConfigError(f"init: {source}: no such file or directory")
    weights = read_weights(source)
    own_method, own = architecture_of(model)
    # Heads are not in the weights: what the file states (its config, config.json), else the recipe's.
    hints = {k: own[k] for k in ("num_heads", "decoder_num_heads") if k in own}
    if weights.method is not None:
        method, theirs = weights.method, dict(weights.config) | {k: hints[k] for k in weights.guessed if k in hints}
    else:
        method, theirs = infer_architecture(weights.state, {**hints, **weights.config}, weights.name)
    shape_keys = [*ENCODER_SHAPE, *(k for k in own if k.endswith(PART_SHAPE) and k in theirs)]
    for key in shape_keys:
        rgb_to_n = key == "in_chans" and theirs.get(key) == 3  # adapted below (`adapt_in_chans`)
        if key in theirs and float(theirs[key]) != float(own[key]) and not rgb_to_n:
            raise ConfigError(f"init {weights.name}: model.{key} is {theirs[key]} in the file and {own[key]} in the "
                              f"recipe; set model.{key}={theirs[key]} (or start from other weights)")
    own_state = model.state_dict()
    state = fit_pos_embed(weights.state, model.patch_embed.grid_size, target_grid(theirs))
    if theirs.get("in_chans", 3) != own["in_chans"]:
        state["patch_embed.proj.weight"] = adapt_in_chans(state["patch_embed.proj.weight"], own["in_chans"])
        # pixel heads predict p * p * C values: for other channels they start anew
        state = {k: v for k, v in state.items() if not (k.startswith("decoder_pred.") and
                                                        k in own_state and v.shape != own_state[k].shape)}
        log.info("init: the RGB patch embedding of %s adapted to %d channels", weights.name, own["in_chans"])
    taken = {k: v for k, v in state.items() if k in own_state}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own_state[k].shape)}" for k, v in taken.items()
             if v.shape != own_state[k].shape]
    if wrong:
        raise ConfigError(f"init {weights.name}: shapes differ from the recipe's {own_method} model (file vs recipe): "
                          f"{shorten(wrong, 4)}")
    model.load_state_dict(taken, strict=False)
    initialised = _parts(k for k in own_state if k not in taken)
    teacher = getattr(model, "teacher_module", None)
    if teacher in initialised:  # an EMA teacher starts from the loaded student, as it does from a fresh one
        model.reset_teacher()
        initialised.remove(teacher)
    ignored = _parts(k for k in state if k not in own_state)
    log.info("init: %d tensors of %s (%s) loaded; %s; %s", len(taken), weights.name, method,
             f"initialised as new: {', '.join(initialised)}" if initialised else "nothing initialised as new",
             f"not used: {', '.join(ignored)}" if ignored else "all of the file used")
    return {"source": weights.name, "method": method, "loaded": len(taken), "initialised": initialised,
            "ignored": ignored}
