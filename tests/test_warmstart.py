"""Pretraining that starts from released weights (`init=PATH`): official MAE files, Hugging Face
directories, official CAE checkpoints, encoder-only files, mismatches, and a run that records it."""

import json

import pytest
import torch
from test_cae import _randomize, _to_official, _toy

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.models import build_model
from mimkit.models.vit import resample_pos_embed
from mimkit.warmstart import init_from

TINY = dict(preset="mae_vit_tiny_cifar_patch4", depth=2, decoder_depth=1)
RECIPE = "configs/pretrain/mae_vit_tiny_cifar10.yaml"


def _source(seed: int = 5, **kw):
    """A 'released' MAE: every parameter random (LayerNorms and biases too), so nothing matches by chance."""
    torch.manual_seed(seed)
    return _randomize(build_model("mae", TINY | kw), seed=seed).eval()


def _loss(model, imgs, seed=3):
    return model(imgs, generator=torch.Generator().manual_seed(seed)).loss


def test_an_official_mae_checkpoint_gives_the_source_loss_at_step_0(tmp_path):
    source = _source()
    torch.save({"model": source.state_dict()}, tmp_path / "mae_visualize_tiny.pth")  # the official layout
    torch.manual_seed(0)
    fresh = build_model("mae", TINY).eval()
    report = init_from(fresh, tmp_path / "mae_visualize_tiny.pth")
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_loss(fresh, imgs), _loss(source, imgs), atol=1e-5, rtol=0)
    assert report["initialised"] == [] and report["ignored"] == []


def test_a_hugging_face_directory_gives_transformers_loss_at_step_0(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mimkit.export import hf_config_from_mae

    torch.manual_seed(0)
    shape = build_model("mae", TINY)
    torch.manual_seed(7)
    ref = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**hf_config_from_mae(shape.cfg))).eval()
    ref.save_pretrained(tmp_path / "hf")
    torch.manual_seed(0)
    fresh = build_model("mae", TINY).eval()
    init_from(fresh, tmp_path / "hf")
    g = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, fresh.patch_embed.num_patches, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(fresh(imgs, noise=noise).loss, ref(pixel_values=imgs, noise=noise).loss,
                                   atol=1e-5, rtol=0)


def test_an_encoder_only_file_leaves_the_decoder_at_its_initialisation(tmp_path):
    source = _source()
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder}, tmp_path / "mae_pretrain_tiny.pth")  # as mae_pretrain_vit_base.pth
    torch.manual_seed(0)
    initial = build_model("mae", TINY).state_dict()
    torch.manual_seed(0)
    fresh = build_model("mae", TINY)
    report = init_from(fresh, tmp_path / "mae_pretrain_tiny.pth")
    state = fresh.state_dict()
    for k, v in state.items():
        expected = encoder[k] if k in encoder else initial[k]
        assert torch.equal(v, expected), k
    assert report["initialised"] == ["mask_token", "decoder_pos_embed", "decoder_embed", "decoder_blocks",
                                    "decoder_norm",
                                    "decoder_pred"]


def test_position_embeddings_are_resampled_to_the_recipe_grid(tmp_path):
    source = _source(img_size=32)
    torch.save({"model": {k: v for k, v in source.state_dict().items() if not k.startswith("decoder")}},
               tmp_path / "enc.pth")
    fresh = build_model("mae", TINY | dict(img_size=48))
    init_from(fresh, tmp_path / "enc.pth")  # 8 x 8 -> 12 x 12 patches
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert fresh.pos_embed.shape == (1, 145, 192) and torch.equal(fresh.pos_embed[:, 0], source.pos_embed[:, 0])
    assert torch.equal(fresh.pos_embed.data, resample_pos_embed(source.pos_embed.data, 12))


@pytest.mark.parametrize("field, value, recipe", [("embed_dim", 64, 192), ("depth", 3, 2), ("patch_size", 8, 4)])
def test_an_architecture_mismatch_is_one_line_naming_both_values(tmp_path, field, value, recipe):
    kw = {field: value} | ({"num_heads": 2} if field == "embed_dim" else {})
    torch.save({"model": _source(**kw).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(ConfigError) as e:
        init_from(build_model("mae", TINY), tmp_path / "other.pth")
    assert str(e.value) == (f"init {tmp_path / 'other.pth'}: model.{field} is {value} in the file and {recipe} in the "
                            f"recipe; set model.{field}={value} (or start from other weights)")


def test_an_official_cae_checkpoint_gives_the_source_loss_at_step_0(tmp_path):
    source = _randomize(_toy(), seed=5).eval()
    torch.save({"model": _to_official(source.state_dict()), "epoch": 299}, tmp_path / "cae_official.pth")
    fresh = _toy().eval()
    init_from(fresh, tmp_path / "cae_official.pth")
    imgs = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_loss(fresh, imgs), _loss(source, imgs), atol=1e-5, rtol=0)


def test_pretrain_records_where_it_started_and_a_resume_does_not_read_it_again(tmp_path, capsys):
    weights = tmp_path / "released.pth"
    torch.save({"model": _source().state_dict()}, weights)
    args = ["pretrain", RECIPE, *(f"model.{k}={v}" for k, v in TINY.items()), "train.batch_size=8",
            "train.epochs=2", "data.limit=32", "data.num_workers=0", "train.vis_images=0", f"init={weights}",
            f"out_dir={tmp_path / 'run'}"]
    assert main([*args, "train.max_steps=2"]) == 0
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"init: {weights}" in config
    weights.unlink()  # the run continues from its own checkpoint
    assert main([*args, "--resume", "auto"]) == 0
    last = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["step"] == 8
    assert main([*args, f"out_dir={tmp_path / 'again'}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"mimkit: error: init: {weights}: no such file or directory"


@pytest.mark.parametrize("method, preset, teacher", [("ijepa", "ijepa_vit_tiny_cifar_patch4", "target_encoder"),
                                                     ("data2vec2", "data2vec2_vit_tiny_cifar_patch4", "teacher")])
def test_an_ema_teacher_starts_from_the_loaded_encoder(tmp_path, method, preset, teacher):
    torch.manual_seed(1)
    source = build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=2, decoder_depth=1)
    torch.save({"model": source.encoder_state_dict()}, tmp_path / "mae.pth")  # mae_pretrain_*: the encoder
    model = build_model(method, preset=preset, depth=2, **({"average_top_k": 2} if method == "data2vec2" else {}))
    info = init_from(model, tmp_path / "mae.pth")
    assert teacher not in info["initialised"]
    for name, value in getattr(model, teacher).state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name
    assert not any(p.requires_grad for p in getattr(model, teacher).parameters())
