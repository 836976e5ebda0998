from pathlib import Path

import pytest
import torch
import yaml

from mimkit.config import Config, ConfigError, load_config, load_eval_config
from mimkit.models import build_model, resolve_model_config, resolved_config

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/**/*.yaml"))


def test_defaults_are_the_papers():
    cfg = Config()
    assert cfg.train.betas == (0.9, 0.95) and cfg.train.weight_decay == 0.05 and cfg.train.blr == 1.5e-4
    assert cfg.train.warmup_epochs == 40 and cfg.data.scale == (0.2, 1.0)
    assert resolve_model_config("mae", {}).mask_ratio == 0.75


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "train.blr=1", "train.lr=1e-4", "data.scale=[0.5, 1.0]",
                             "model.preset=mae_vit_base_patch16"])
    assert cfg.train.epochs == 3 and cfg.train.blr == 1.0 and isinstance(cfg.train.blr, float)
    assert cfg.train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string; a float field accepts it
    assert cfg.data.scale == (0.5, 1.0)
    assert resolve_model_config(cfg.method, cfg.model).embed_dim == 768


@pytest.mark.parametrize("overrides, message", [
    (["train.epocs=2"], "train.epocs: unknown key; did you mean train.epochs?"),
    (["trian.epochs=2"], "trian: unknown key; did you mean train?"),
    (["train.epochs=two"], "train.epochs: expected int, got str 'two'"),
    (["train.epochs=2.5"], "train.epochs: expected int, got float 2.5"),
    (["data.hflip=maybe"], "data.hflip: expected bool, got str 'maybe'"),
    (["data.scale=[0.2]"], "data.scale: expected 2 values, got 1"),
    (["train.precision=fp8"], "train.precision: 'fp8' is not one of fp32, bf16, fp16"),
    (["train.batch_size=0"], "train.batch_size: must be >= 1, got 0"),
    (["train.epochs"], "train.epochs: an override must look like section.key=value"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_misspelt_and_mistyped_yaml_keys(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("train:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"^train.batch_sise: unknown key; did you mean train.batch_size\?$"):
        load_config(bad_key)
    bad_type = tmp_path / "b.yaml"
    bad_type.write_text("train:\n  clip_grad: [1]\n")
    with pytest.raises(ConfigError, match=r"^train.clip_grad: expected float, got list \[1\]$"):
        load_config(bad_type)


def test_model_section_is_checked_against_the_method():
    with pytest.raises(ConfigError, match=r"^model.embed_dimm: unknown key; did you mean model.embed_dim\?$"):
        resolve_model_config("mae", {"embed_dimm": 8})
    unknown = r"^model.preset: unknown preset 'mae_vit_bsae_patch16'; did you mean mae_vit_base_patch16\?$"
    with pytest.raises(ConfigError, match=unknown):
        resolve_model_config("mae", {"preset": "mae_vit_bsae_patch16"})
    with pytest.raises(ConfigError, match=r"^method: unknown method 'maee'; did you mean mae\?"):
        resolve_model_config("maee", {})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_builds(path):
    if path.parent.name == "eval":
        protocol = yaml.safe_load(path.read_text())["protocol"]
        cfg = load_eval_config(protocol, path)
        assert cfg.protocol == protocol and cfg.train.epochs >= 1
        with pytest.raises(ConfigError, match=f"is a {protocol} recipe"):
            load_eval_config("knn" if protocol != "knn" else "finetune", path)
        return
    cfg = load_config(path)
    resolved = resolved_config(cfg)
    with torch.device("meta"):  # ViT-H has 630M parameters: build shapes only
        model = build_model(cfg.method, resolved["model"])
    assert model.patch_embed.num_patches > 0 and resolved["train"]["epochs"] == cfg.train.epochs
