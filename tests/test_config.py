import re
from pathlib import Path

import pytest
import torch
import yaml

from mimkit.config import Config, ConfigError, check_run, load_config
from mimkit.eval.config import load_eval_config
from mimkit.models import build_model, resolve_model_config, resolved_config
from mimkit.train.loop import pretrain

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
    (["train.precision=fp8"], "train.precision: 'fp8' is not one of auto, fp32, bf16, fp16"),
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


# Each of these was accepted, or failed with a traceback or only at the first forward (issue 12).
BAD_VALUES = [
    ("model.mask_ratio=1.0", "model.mask_ratio: must be in (0, 1), got 1.0"),
    ("model.mask_ratio=0", "model.mask_ratio: must be in (0, 1), got 0"),
    ("model.mask_ratio=-0.5", "model.mask_ratio: must be in (0, 1), got -0.5"),
    ("model.patch_size=5", "model.patch_size: 5 does not divide model.img_size=32"),
    ("model.num_heads=5", "model.embed_dim: 192 is not divisible by model.num_heads=5"),
    ("model.num_heads=0", "model.num_heads: must be >= 1, got 0"),
    ("model.depth=0", "model.depth: must be >= 1, got 0"),
    ("model.decoder_num_heads=3", "model.decoder_embed_dim: 128 is not divisible by model.decoder_num_heads=3"),
    ("model.embed_dim=190", "model.embed_dim: must be a positive multiple of 4 (2-D sin-cos positions), got 190"),
    ("train.device=cuda:99", "train.device: 'cuda:99' is not available here"),
    ("train.device=tpu", "train.device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ("train.blr=.nan", "train.blr: must be a finite number >= 0, got nan"),
    ("train.lr=.inf", "train.lr: must be a finite number >= 0, got inf"),
    ("train.min_lr=-1e-5", "train.min_lr: must be a finite number >= 0, got -1e-05"),
    ("train.betas=[0.9, 1.0]", "train.betas: each must be in [0, 1), got [0.9, 1.0]"),
    ("train.betas=[-0.1, 0.9]", "train.betas: each must be in [0, 1), got [-0.1, 0.9]"),
    ("data.ratio=[1.5, 0.5]", "data.ratio: expected 0.0 <= min <= max <= inf, got [1.5, 0.5]"),
    ("data.ratio=[0, 1]", "data.ratio: must be a finite number > 0, got 0"),
    ("data.std=[0.2, 0, 0.2]", "data.std: every value must be > 0, got [0.2, 0.0, 0.2]"),
    ("data.scale=[0, 0]", "data.scale: max must be > 0, got [0.0, 0.0]"),
    ("data.max_member_bytes=0", "data.max_member_bytes: must be >= 1, got 0"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_values_are_one_line_before_anything_is_built(override, message, tmp_path, capsys):
    """`--print-config` validates exactly what a run does, so nothing here builds a model or reads data."""
    from mimkit.cli import main

    args = ["pretrain", "configs/pretrain/mae_vit_tiny_cifar10.yaml", override, f"out_dir={tmp_path}"]
    assert main([*args, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mimkit: error: {message}") and err.count("\n") == 1, err
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        pretrain(load_config(None, [override, f"out_dir={tmp_path}", "model.preset=mae_vit_tiny_cifar_patch4"]))
    assert list(tmp_path.iterdir()) == []  # refused before the run touched out_dir


def test_out_dir_must_be_a_directory_mimkit_can_write(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^out_dir: .*/file exists and is not a directory$"):
        check_run(load_config(None, [f"out_dir={tmp_path / 'file'}"]))
    with pytest.raises(ConfigError, match=r"^out_dir: cannot write in .*/file/run \(.*/file is not a writable "
                                          r"directory\)$"):
        check_run(load_config(None, [f"out_dir={tmp_path / 'file' / 'run'}"]))
    # /proc/self is a directory nobody may create entries in, root included
    with pytest.raises(ConfigError, match=r"^out_dir: cannot write in /proc/self/run \(/proc/self is not a writable"):
        check_run(load_config(None, ["out_dir=/proc/self/run"]))
    check_run(load_config(None, [f"out_dir={tmp_path / 'new' / 'run'}"]))  # made when the run starts


def test_a_key_given_twice_in_a_recipe_is_an_error(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("train:\n  epochs: 2\ndata:\n  limit: 8\ntrain:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: key 'train' appears twice \(lines 1 and 5\)$"):
        load_config(recipe)
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' appears twice \(lines 2 and 3\)$"):
        load_config(nested)
    merged = tmp_path / "merged.yaml"  # a YAML merge key is not a duplicate
    merged.write_text("base: &b {epochs: 2}\ntrain:\n  <<: *b\n  batch_size: 4\n")
    assert yaml.safe_load(merged.read_text())["train"] == {"epochs": 2, "batch_size": 4}
    with pytest.raises(ConfigError, match=r"^base: unknown key"):  # read without complaint, then checked
        load_config(merged)


def test_eval_values_are_checked_too():
    for override, message in [("probe.k=0", "probe.k: must be >= 1, got 0"),
                              ("crop_pct=1.5", "crop_pct: must be in [0, 1] (0 = off), got 1.5"),
                              ("finetune.mix_prob=2", "finetune.mix_prob: must be in [0, 1], got 2.0"),
                              ("train.betas=[0.9, 1.5]", "train.betas: each must be in [0, 1), got [0.9, 1.5]")]:
        with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
            load_eval_config("linprobe", None, [override])


def test_overrides_never_change_the_protocol_defaults():
    """load_eval_config once wrote overrides into PROTOCOL_DEFAULTS' own sections, so one call's
    `train.betas` became every later call's default."""
    load_eval_config("linprobe", None, ["train.betas=[0.5, 0.6]", "train.epochs=3"])
    assert load_eval_config("linprobe").train.epochs == 90 and load_eval_config("linprobe").train.betas == (0.9, 0.95)


def test_cae_takes_its_image_normalisation_from_the_data_section():
    from mimkit.models import model_config_of

    cfg = load_config(None, ["method=cae", "model.preset=cae_vit_tiny_cifar_patch4", "data.mean=[0.5, 0.5, 0.5]",
                             "data.std=[0.25, 0.25, 0.25]"])
    model = model_config_of(cfg)
    assert model.image_mean == (0.5, 0.5, 0.5) and model.image_std == (0.25, 0.25, 0.25)
    assert resolved_config(cfg)["model"]["image_std"] == [0.25, 0.25, 0.25]
    clash = load_config(None, ["method=cae", "model.image_mean=[0.1, 0.1, 0.1]", "data.mean=[0.5, 0.5, 0.5]"])
    with pytest.raises(ConfigError, match=r"^model\.image_mean: \[0\.1, 0\.1, 0\.1\] differs from data\.mean "
                                          r"\[0\.5, 0\.5, 0\.5\]; it is the normalisation the data pipeline applies"):
        model_config_of(clash)
    assert model_config_of(load_config(None, [])).mask_ratio == 0.75  # MAE has no such field


def test_values_from_the_command_line_are_not_parsed_as_yaml(tmp_path):
    """`mimkit eval knn on --data yes` once became checkpoint=on, data.root=yes overrides, read as booleans."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("protocol: knn\ndata:\n  root: elsewhere\n")
    cfg = load_eval_config("knn", recipe, ["probe.k=5"], given={"checkpoint": "on", "data": {"root": "yes"}})
    assert cfg.checkpoint == "on" and cfg.data.root == "yes" and cfg.probe.k == 5  # above the recipe
    assert load_eval_config("knn", None, ["data.root=mine"], given={"data": {"root": "yes"}}).data.root == "mine"
