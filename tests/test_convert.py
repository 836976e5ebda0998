"""Weights in and out: official MAE, Hugging Face, timm and mimkit files; position-embedding resampling;
errors; the `convert` / `export` commands; feature extraction."""

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mimkit
from mimkit.architecture import architecture_of
from mimkit.cli import main
from mimkit.convert import (
    WeightsError,
    load,
    load_weights,
    read_state,
    read_weights,
)
from mimkit.export import export, mae_to_hf, timm_state_dict
from mimkit.models import build_model
from mimkit.models.vit import VisionTransformer, resample_pos_embed
from mimkit.serialization import read_torch

transformers = pytest.importorskip("transformers")  # a dev dependency; CI installs it

IMG = 32


def _randomize(model, seed=0):
    """Every parameter random (position embeddings included), so that no mapping error can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(mean + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _mae():
    # 192 wide: 3 heads by the standard table; the 128-wide decoder (4 heads) is not standard.
    return _randomize(build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=2, decoder_depth=1))


def _encoder():
    return _randomize(VisionTransformer(img_size=IMG, patch_size=4, embed_dim=192, depth=2, num_heads=3))


def _classifier(global_pool="token"):
    return _randomize(VisionTransformer(img_size=IMG, patch_size=4, embed_dim=192, depth=2, num_heads=3,
                                        num_classes=10, global_pool=global_pool))


MODELS = {"mae": _mae, "encoder": _encoder, "classifier": _classifier, "classifier_avg": lambda: _classifier("avg")}


def _images(n=2, size=IMG, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert v.dtype == sb[k].dtype and torch.equal(v, sb[k]), k


def _arch(model):
    method, cfg = architecture_of(model)
    return method, {k: v for k, v in cfg.items() if k != "preset"}


def _mimkit_checkpoint(model, path):
    """What the training loop saves, reduced to what loading needs."""
    method, cfg = architecture_of(model)
    torch.save({"model": model.state_dict(), "method": method, "config": {"model": cfg}, "step": 3}, path)
    return path


# --- round trips -------------------------------------------------------------------------------


# transformers' ViT cannot average-pool: that pair is test_hf_export_refuses_average_pooling's.
ROUND_TRIPS = [(k, to) for to in ("hf", "official", "safetensors") for k in MODELS
               if (k, to) != ("classifier_avg", "hf")]


@pytest.mark.parametrize("kind, to", ROUND_TRIPS)
def test_round_trip_is_exact(kind, to, tmp_path):
    model = MODELS[kind]()
    out = export(model, tmp_path / ("out" if to == "hf" else f"out.{'pth' if to == 'official' else to}"), to)
    back = load(out)
    assert type(back) is type(model) and not back.training
    assert _arch(back) == _arch(model)
    _same_weights(back, model)


@pytest.mark.parametrize("kind", list(MODELS))
def test_official_layout_without_mimkit_entries_reads_the_architecture_from_the_weights(kind, tmp_path):
    """The real official files hold only {"model": state}: mae_pretrain (encoder + norm),
    mae_visualize (with decoder), mae_finetuned (fc_norm + head, no norm)."""
    model = MODELS[kind]()
    state = model.state_dict()
    avg = kind == "classifier_avg"
    assert ("norm.weight" in state) != avg and ("fc_norm.weight" in state) == avg
    torch.save({"model": state}, tmp_path / "official.pth")
    extra = {"decoder_num_heads": 4} if kind == "mae" else {}  # 128-wide decoder: not in the table
    back = load(tmp_path / "official.pth", **extra)
    assert type(back) is type(model) and _arch(back) == _arch(model)
    _same_weights(back, model)


def test_wrapped_state_dicts_are_unwrapped(tmp_path):
    model = _encoder()
    ddp = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DistributedDataParallel
    torch.save({"model": ddp}, tmp_path / "ddp.pth")
    _same_weights(load(tmp_path / "ddp.pth"), model)
    torch.save({"state_dict": model.state_dict(), "arch": "vit_tiny_patch4_32"}, tmp_path / "timm_train.pth.tar")
    _same_weights(load(tmp_path / "timm_train.pth.tar"), model)  # timm's train.py checkpoints


def test_official_training_checkpoint_args_give_the_mae_settings(tmp_path):
    model = _mae()
    args = argparse.Namespace(model="mae_vit_tiny", norm_pix_loss=True, mask_ratio=0.6, input_size=32)
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 7, "args": args}, tmp_path / "ck.pth")
    back = load(tmp_path / "ck.pth", decoder_num_heads=4)
    assert back.cfg.norm_pix_loss is True and back.cfg.mask_ratio == 0.6


def test_timm_files_round_trip_the_encoder(tmp_path):
    for kind in ("mae", "encoder", "classifier", "classifier_avg"):
        model = MODELS[kind]()
        for name in ("timm.pth", "timm.safetensors"):
            back = load(export(model, tmp_path / name, "timm", overwrite=True))
            assert type(back) is VisionTransformer
            enc = model.encoder_state_dict() if kind == "mae" else model.state_dict()
            assert back.state_dict().keys() == enc.keys()
            assert all(torch.equal(back.state_dict()[k], v) for k, v in enc.items())
        # a bare timm state dict carries no architecture: it is read off the weights
        bare = torch.load(tmp_path / "timm.pth", weights_only=True)
        assert isinstance(bare, dict) and all(isinstance(v, torch.Tensor) for v in bare.values())
        assert ("head.weight" in bare) == kind.startswith("classifier")
        assert not any(k.startswith(("decoder", "mask_token")) for k in bare)
        assert _arch(load(tmp_path / "timm.pth"))[1]["num_classes"] == (10 if kind.startswith("classifier") else 0)


def test_timm_no_embed_class_position_embedding_gets_a_zero_cls_row():
    model = _encoder()
    state = model.state_dict()
    state["pos_embed"] = state["pos_embed"][:, 1:]  # timm `no_embed_class`: no row for the cls token
    back = load(state)
    assert torch.equal(back.pos_embed[:, 0], torch.zeros(1, 192))
    assert torch.equal(back.pos_embed[:, 1:], model.pos_embed[:, 1:])


def test_load_weights_into_a_preset_drops_only_a_decoder(tmp_path):
    mae = _randomize(build_model("mae", preset="mae_vit_tiny_cifar_patch4"))
    export(mae, tmp_path / "mae.pth", "official")
    fresh = build_model("mae", preset="mae_vit_tiny_cifar_patch4")
    _same_weights(load_weights(fresh, tmp_path / "mae.pth"), mae)
    enc = VisionTransformer(img_size=64, patch_size=4, embed_dim=192, depth=12, num_heads=3)
    load_weights(enc, tmp_path / "mae.pth")  # 8x8 -> 16x16 grid, decoder dropped
    assert torch.equal(enc.blocks[5].mlp.fc2.weight, mae.blocks[5].mlp.fc2.weight)
    assert torch.equal(enc.pos_embed, resample_pos_embed(mae.pos_embed, 16))
    with pytest.raises(WeightsError, match=r"missing: head.weight, head.bias"):
        load_weights(VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                                       num_classes=10), tmp_path / "mae.pth")


# --- transformers ---------------------------------------------------------------------------------


def _from_pretrained(cls, path, **kw):
    model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_transformers_loads_the_mae_export_with_equal_outputs(tmp_path):
    model = _mae()
    export(model, tmp_path / "hf", "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["ViTMAEForPreTraining"] and cfg["layer_norm_eps"] == 1e-6
    assert (cfg["hidden_size"], cfg["decoder_hidden_size"], cfg["decoder_num_attention_heads"]) == (192, 128, 4)
    ref = _from_pretrained(transformers.ViTMAEForPreTraining, tmp_path / "hf")
    imgs, noise = _images(), torch.rand(2, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        r, o = ref(pixel_values=imgs, noise=noise), model(imgs, noise=noise)
    assert torch.equal(r.mask, o.mask.float()) and torch.equal(r.ids_restore, o.ids_restore)
    torch.testing.assert_close(r.logits, o.pred, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.loss, o.loss, atol=1e-5, rtol=0)


def test_transformers_loads_the_encoder_export_with_equal_outputs(tmp_path):
    model = _encoder()
    export(model, tmp_path / "hf", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["ViTModel"]
    ref = _from_pretrained(transformers.ViTModel, tmp_path / "hf", add_pooling_layer=False)
    imgs = _images()
    with torch.no_grad():
        torch.testing.assert_close(ref(pixel_values=imgs).last_hidden_state, model.forward_features(imgs),
                                   atol=1e-5, rtol=0)


def test_transformers_loads_the_classifier_export_with_equal_logits(tmp_path):
    model = _classifier()
    export(model, tmp_path / "hf", "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["ViTForImageClassification"] and len(cfg["id2label"]) == 10
    ref = _from_pretrained(transformers.ViTForImageClassification, tmp_path / "hf")
    imgs = _images()
    with torch.no_grad():
        torch.testing.assert_close(ref(pixel_values=imgs).logits, model(imgs), atol=1e-5, rtol=0)


def test_hf_export_refuses_average_pooling(tmp_path):
    with pytest.raises(WeightsError, match=r"averaging the patch tokens through fc_norm.*--to timm"):
        export(_classifier("avg"), tmp_path / "hf", "hf")


def _hf_config(cls, **extra):
    kw = dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768, image_size=IMG,
              patch_size=4, layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if cls is transformers.ViTMAEConfig:
        kw |= dict(decoder_hidden_size=128, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
                   decoder_intermediate_size=512, mask_ratio=0.75)
    return cls(**kw, **extra)


def _hf_model(cls, cfg_cls, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(_hf_config(cfg_cls, **({"num_labels": 7} if cls is transformers.ViTForImageClassification else {})),
                **kw)
    return _randomize(model, seed)


@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_reads_directories_saved_by_transformers(serialization, tmp_path):
    """save_pretrained of the installed transformers (4.x-style names on disk, and the
    `decoder.decoder_encoder.layer` names it writes for the ViTMAE decoder)."""
    imgs = _images()

    def saved(model, name):
        d = tmp_path / name
        model.save_pretrained(d)
        if serialization == "bin":  # older hub repos ship pytorch_model.bin
            from safetensors.torch import load_file

            torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
            (d / "model.safetensors").unlink()
        return d

    ref = _hf_model(transformers.ViTMAEForPreTraining, transformers.ViTMAEConfig)
    ours = load(saved(ref, "mae"))
    assert type(ours).__name__ == "MAE" and ours.cfg.decoder_num_heads == 4  # heads from config.json
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(imgs, noise=noise).pred, ref(pixel_values=imgs, noise=noise).logits,
                                   atol=1e-5, rtol=0)

    for cls, cfg_cls, kw in ((transformers.ViTMAEModel, transformers.ViTMAEConfig, {}),
                             (transformers.ViTModel, transformers.ViTConfig, {})):  # ViTModel: with its pooler
        ref = _hf_model(cls, cfg_cls, **kw)
        assert (getattr(ref, "pooler", None) is not None) == (cls is transformers.ViTModel)  # dropped on load
        ours = load(saved(ref, cls.__name__))
        assert type(ours) is VisionTransformer and _arch(ours)[1]["num_classes"] == 0
        ref.config.mask_ratio = 0.0  # ViTMAEModel masks even in eval mode; 0 keeps every patch in order
        with torch.no_grad():
            out = ref(pixel_values=imgs, **({"noise": torch.arange(64.0).expand(2, -1)} if cls is
                                           transformers.ViTMAEModel else {}))
            torch.testing.assert_close(ours.forward_features(imgs), out.last_hidden_state, atol=1e-5, rtol=0)

    ref = _hf_model(transformers.ViTForImageClassification, transformers.ViTConfig)
    ours = load(saved(ref, "cls"))
    assert _arch(ours)[1]["num_classes"] == 7
    with torch.no_grad():
        torch.testing.assert_close(ours(imgs), ref(pixel_values=imgs).logits, atol=1e-5, rtol=0)


def test_reads_sharded_hugging_face_directories(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _mae()
    export(model, tmp_path / "hf", "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, tmp_path / "hf" / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    _same_weights(load(tmp_path / "hf"), model)


def test_reads_transformers_5_in_memory_and_4x_hub_names():
    model = _mae()
    for names in (mae_to_hf(model.state_dict()), mae_to_hf(model.state_dict(), legacy=True)):
        _same_weights(load(names, decoder_num_heads=4), model)
    enc = _encoder()
    for names in (mae_to_hf(enc.state_dict(), prefix=""), mae_to_hf(enc.state_dict(), prefix="", legacy=True)):
        _same_weights(load(names), enc)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in mae_to_hf(model.state_dict(), legacy=True)
    assert "decoder.decoder_layers.0.attention.attention.query.weight" in mae_to_hf(model.state_dict(), legacy=True)


# --- timm layout -----------------------------------------------------------------------------------

# timm `vit_base_patch16_224` (timm 1.0, `timm.create_model(...).state_dict()`), written out since timm
# is not a dependency.
_BLOCK = [("norm1.weight", (768,)), ("norm1.bias", (768,)), ("attn.qkv.weight", (2304, 768)),
          ("attn.qkv.bias", (2304,)), ("attn.proj.weight", (768, 768)), ("attn.proj.bias", (768,)),
          ("norm2.weight", (768,)), ("norm2.bias", (768,)), ("mlp.fc1.weight", (3072, 768)),
          ("mlp.fc1.bias", (3072,)), ("mlp.fc2.weight", (768, 3072)), ("mlp.fc2.bias", (768,))]
TIMM_VIT_BASE_PATCH16_224 = (
    [("cls_token", (1, 1, 768)), ("pos_embed", (1, 197, 768)), ("patch_embed.proj.weight", (768, 3, 16, 16)),
     ("patch_embed.proj.bias", (768,))]
    + [(f"blocks.{i}.{name}", shape) for i in range(12) for name, shape in _BLOCK]
    + [("norm.weight", (768,)), ("norm.bias", (768,)), ("head.weight", (1000, 768)), ("head.bias", (1000,))]
)


def test_timm_export_has_exactly_the_keys_and_shapes_of_vit_base_patch16_224():
    with torch.device("meta"):
        model = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000)
    state = timm_state_dict(model)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == TIMM_VIT_BASE_PATCH16_224
    with torch.device("meta"):  # an MAE exports its encoder: the same keys without the head
        mae = build_model("mae", preset="mae_vit_base_patch16")
    assert [(k, tuple(v.shape)) for k, v in mae.encoder_state_dict().items()] == TIMM_VIT_BASE_PATCH16_224[:-2]


# --- position embeddings ------------------------------------------------------------------------


def _reference_bicubic(pos, new):
    """Independent transcription of MAE's `interpolate_pos_embed` (bicubic, align_corners=False)."""
    cls, grid = pos[:, :1], pos[:, 1:]
    old, dim = int(grid.shape[1] ** 0.5), grid.shape[2]
    grid = grid.reshape(-1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def test_pos_embed_interpolation_identity_and_bicubic():
    pos = torch.randn(1, 1 + 14 * 14, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resample_pos_embed(pos, 14), pos)
    new = resample_pos_embed(pos, 16)
    assert new.shape == (1, 1 + 16 * 16, 64)
    assert torch.equal(new[:, 0], pos[:, 0])
    torch.testing.assert_close(new, _reference_bicubic(pos, 16), atol=1e-6, rtol=0)
    assert not torch.allclose(new[:, 1:197], pos[:, 1:])  # it did move


def test_pos_embed_interpolation_at_load_and_export(tmp_path):
    model = _randomize(VisionTransformer(img_size=56, patch_size=4, embed_dim=192, depth=1, num_heads=3))  # 14x14
    export(model, tmp_path / "m.safetensors", "safetensors")
    same = load(tmp_path / "m.safetensors", img_size=56)
    assert torch.equal(same.pos_embed, model.pos_embed)
    big = load(tmp_path / "m.safetensors", img_size=64)  # 16x16
    assert big.img_size == (64, 64) and torch.equal(big.pos_embed[:, 0], model.pos_embed[:, 0])
    torch.testing.assert_close(big.pos_embed, _reference_bicubic(model.pos_embed, 16), atol=1e-6, rtol=0)
    assert big(torch.zeros(1, 3, 64, 64)).shape == (1, 192)
    # at export: the timm file and the HF config describe the new resolution
    export(model, tmp_path / "t.pth", "timm", img_size=64)
    assert torch.load(tmp_path / "t.pth", weights_only=True)["pos_embed"].shape == (1, 257, 192)
    mae = _mae()  # decoder position embeddings follow
    export(mae, tmp_path / "hf", "hf", img_size=48)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_size"] == 48
    back = load(tmp_path / "hf")
    assert back.pos_embed.shape == (1, 145, 192) and back.decoder_pos_embed.shape == (1, 145, 128)
    torch.testing.assert_close(back.decoder_pos_embed, _reference_bicubic(mae.decoder_pos_embed, 12), atol=1e-6, rtol=0)


# --- errors -----------------------------------------------------------------------------------------


def _one_paragraph(e):
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 700, msg
    return msg


class _RunsCode:
    """A pickle that, loaded without care, creates a file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_files_that_pickle_code_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": _encoder().state_dict(), "extra": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError) as e:
        load(tmp_path / "evil.pth")
    msg = _one_paragraph(e)
    assert "evil.pth: holds pickled io.open, which could run code when loaded" in msg
    assert "If you trust the file" in msg and not marker.exists()


def test_checkpoints_pickled_under_either_numpy_major_version_load(tmp_path):
    """mimkit checkpoints keep NumPy's random state; NumPy 1 and 2 name its rebuild function differently."""
    state = np.random.get_state()
    torch.save({"model": {}, "step": 1, "rng": state}, tmp_path / "np2.pt")
    with zipfile.ZipFile(tmp_path / "np2.pt") as src, zipfile.ZipFile(tmp_path / "np1.pt", "w") as out:
        for info in src.infolist():  # rename the pickled global as NumPy 1 writes it
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            out.writestr(info, data)
    assert b"cnumpy.core.multiarray" in zipfile.ZipFile(tmp_path / "np1.pt").read("np2/data.pkl")
    for name in ("np1.pt", "np2.pt"):
        keys = read_torch(tmp_path / name)["rng"][1]
        assert isinstance(keys, np.ndarray) and np.array_equal(keys, state[1])


def test_corrupt_files_get_a_clear_error(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(WeightsError) as e:
        load(tmp_path / "junk.pth")
    assert "junk.pth: cannot read weights, the file is corrupt" in _one_paragraph(e)
    export(_encoder(), tmp_path / "ok.pth", "official")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(WeightsError, match=r"cut.pth: cannot read weights, the file is corrupt"):
        load(tmp_path / "cut.pth")
    export(_encoder(), tmp_path / "ok.safetensors", "safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightsError) as e:
        load(tmp_path / "cut.safetensors")
    assert "cut.safetensors: cannot read weights, the file is corrupt or not safetensors" in _one_paragraph(e)
    with pytest.raises(FileNotFoundError, match="nowhere.pth: no such file"):
        load(tmp_path / "nowhere.pth")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="needs a config.json"):
        load(tmp_path / "emptydir")


def test_another_architecture_gets_a_clear_error(tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "bn1.bias": torch.zeros(64),
              "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1000, 2048)}
    torch.save({"model": resnet}, tmp_path / "resnet.pth")
    with pytest.raises(WeightsError) as e:
        load(tmp_path / "resnet.pth")
    msg = _one_paragraph(e)
    assert "resnet.pth: not a Vision Transformer checkpoint" in msg and "conv1.weight" in msg
    assert "another architecture" in msg
    # a ViT of another shape than asked for
    export(_encoder(), tmp_path / "vit.pth", "official")
    with pytest.raises(WeightsError) as e:
        load_weights(VisionTransformer(img_size=IMG, patch_size=4, embed_dim=384, depth=2, num_heads=6),
                     tmp_path / "vit.pth")
    assert "shape mismatch (file vs model): cls_token (1, 1, 192) vs (1, 1, 384)" in _one_paragraph(e)
    # a Hugging Face model that is not a ViT
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(WeightsError, match=r"model_type 'bert' is not a ViT"):
        load(tmp_path / "bert")


def test_missing_keys_get_a_clear_error(tmp_path):
    state = _encoder().state_dict()
    del state["blocks.1.norm1.weight"], state["norm.bias"]
    with pytest.raises(WeightsError) as e:
        load(state)
    msg = _one_paragraph(e)
    assert "missing: blocks.1.norm1.weight, norm.bias" in msg and "incomplete" in msg
    state = _mae().state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("decoder_blocks.0.")}
    state |= {k.replace("decoder_blocks.0.", "decoder_blocks.1."): v for k, v in _mae().state_dict().items()
              if k.startswith("decoder_blocks.0.")}
    with pytest.raises(WeightsError, match=r"decoder_blocks 0 missing \(found 1 of 2\)"):
        load(state, decoder_num_heads=4)


def test_unknown_heads_and_options_get_a_clear_error(tmp_path):
    odd = _randomize(VisionTransformer(img_size=IMG, patch_size=4, embed_dim=64, depth=1, num_heads=4))
    torch.save(odd.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(WeightsError) as e:
        load(tmp_path / "odd.pth")
    assert "64-wide encoder" in _one_paragraph(e) and "num_heads=" in str(e.value)
    _same_weights(load(tmp_path / "odd.pth", num_heads=4), odd)
    with pytest.raises(WeightsError, match=r"128-wide decoder.*--decoder-num-heads"):
        load({"model": _mae().state_dict()})
    with pytest.raises(mimkit.config.ConfigError, match=r"vit model, which has no option mask_ratio"):
        load(tmp_path / "odd.pth", num_heads=4, mask_ratio=0.5)


# --- command line ---------------------------------------------------------------------------------


def test_cli_export_and_convert_end_to_end(tmp_path, capsys):
    model = _mae()
    ckpt = _mimkit_checkpoint(model, tmp_path / "checkpoint-00000003.pt")
    assert main(["export", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    _from_pretrained(transformers.ViTMAEForPreTraining, tmp_path / "hf")
    assert main(["export", str(ckpt), "--to", "timm", "--out", str(tmp_path / "t.safetensors"),
                 "--img-size", "48"]) == 0
    t = load(tmp_path / "t.safetensors")
    assert type(t) is VisionTransformer and t.img_size == (48, 48)
    assert main(["export", str(ckpt), "--to", "official", "--out", str(tmp_path / "o.pth")]) == 0
    _same_weights(load(tmp_path / "o.pth"), model)
    assert main(["export", str(ckpt), "--to", "hf", "--encoder-only", "--out", str(tmp_path / "enc")]) == 0
    _from_pretrained(transformers.ViTModel, tmp_path / "enc", add_pooling_layer=False)
    # convert: any source -> a mimkit file that loads alone
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "c.safetensors")]) == 0
    _same_weights(load(tmp_path / "c.safetensors"), model)
    torch.save({"model": model.state_dict()}, tmp_path / "mae_visualize_vit_tiny.pth")  # official, no heads info
    assert main(["convert", str(tmp_path / "mae_visualize_vit_tiny.pth"), str(tmp_path / "c.pt"),
                 "--decoder-num-heads", "4"]) == 0
    assert "mae ViT 192x2 (3 heads), patch 4, 32 px, decoder 128x1" in capsys.readouterr().out
    _same_weights(load(tmp_path / "c.pt"), model)
    # errors: one line, exit status 2
    assert main(["convert", str(tmp_path / "mae_visualize_vit_tiny.pth"), str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimkit: error: ") and err.count("\n") == 1 and "--decoder-num-heads" in err
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert main(["export", str(tmp_path / "junk.pth"), "--to", "timm", "--out", str(tmp_path / "j.pth")]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_an_export_never_replaces_what_is_there_unless_told(tmp_path, capsys):
    model = _mae()
    ckpt = _mimkit_checkpoint(model, tmp_path / "checkpoint-00000003.pt")
    for to, out in (("hf", tmp_path / "hf"), ("safetensors", tmp_path / "m.safetensors")):
        args = ["export", str(ckpt), "--to", to, "--out", str(out)]
        assert main(args) == 0
        before = sorted((p.name, p.stat().st_mtime_ns) for p in out.parent.iterdir())
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err == f"mimkit: error: {out} exists: pass --overwrite (overwrite=True) to replace it\n"
        assert sorted((p.name, p.stat().st_mtime_ns) for p in out.parent.iterdir()) == before
        assert main([*args, "--overwrite"]) == 0
        _same_weights(load(out), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000003.pt", "hf", "m.safetensors"]
    assert main(["convert", str(ckpt), str(tmp_path / "m.safetensors")]) == 2
    assert "m.safetensors exists" in capsys.readouterr().err


def test_an_export_to_a_place_the_os_refuses_is_one_line_and_leaves_nothing(tmp_path, capsys):
    ckpt = _mimkit_checkpoint(_mae(), tmp_path / "checkpoint-00000003.pt")
    # /proc/self takes no new entries, root included
    assert main(["export", str(ckpt), "--to", "official", "--out", "/proc/self/weights.pth"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimkit: error: cannot write /proc/self/weights.pth: ") and err.count("\n") == 1
    assert "Traceback" not in err and not Path("/proc/self/weights.pth").exists()
    (tmp_path / "file").write_text("x")  # a parent that is a file
    assert main(["export", str(ckpt), "--to", "hf", "--out", str(tmp_path / "file" / "hf")]) == 2
    assert capsys.readouterr().err.startswith(f"mimkit: error: cannot write {tmp_path / 'file' / 'hf'}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000003.pt", "file"]


@pytest.mark.parametrize("command", ["convert", "export"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--img-size" in out and "--num-heads" in out and "Hugging Face" in out
    if command == "export":
        assert "{timm,official,hf,safetensors,onnx}" in out


# --- features ---------------------------------------------------------------------------------------


def test_features_cls_mean_tokens():
    model = _mae().train()
    imgs = _images()
    full = model.eval().forward_features(imgs).detach()
    model.train()
    cls, mean, tokens = (mimkit.features(model, imgs, pool=p) for p in ("cls", "mean", "tokens"))
    assert model.training  # restored
    assert cls.shape == (2, 192) and mean.shape == (2, 192) and tokens.shape == (2, 64, 192)
    assert not cls.requires_grad
    assert torch.equal(cls, full[:, 0]) and torch.equal(tokens, full[:, 1:])
    torch.testing.assert_close(mean, full[:, 1:].mean(1))
    assert torch.equal(mimkit.features(model, imgs, "mean"), mean)  # no masking: deterministic
    avg = _classifier("avg")  # MAE fine-tuning layout: the final norm is fc_norm, after the mean
    torch.testing.assert_close(mimkit.features(avg, imgs, "mean"), avg.pool(avg.forward_features(imgs)))
    with pytest.raises(ValueError, match="pool must be one of cls, mean, tokens"):
        mimkit.features(model, imgs, "max")


def test_readme_python_api(tmp_path):
    """The three lines of the README's Python API section."""
    export(_randomize(build_model("mae", preset="mae_vit_tiny_cifar_patch4")), tmp_path / "weights.pth", "official")
    imgs = _images()
    model = mimkit.build_model("mae", preset="mae_vit_tiny_cifar_patch4")
    mimkit.load_weights(model, tmp_path / "weights.pth")
    feats = mimkit.features(model, imgs, pool="mean")
    assert feats.shape == (2, 192)
    assert torch.equal(mimkit.features(mimkit.load(tmp_path / "weights.pth"), imgs, pool="mean"), feats)
    assert read_weights(tmp_path / "weights.pth").method == "mae"


def _timm_folder(tmp_path: Path) -> tuple[Path, str]:
    """A one-step CIFAR-tiny run exported with `--to timm --out DIR`: (DIR, the checkpoint)."""
    run = tmp_path / "run"
    assert main(["pretrain", "configs/pretrain/mae_vit_tiny_cifar10.yaml", "model.depth=1", "train.max_steps=1",
                 "data.limit=64", "train.batch_size=32", "train.vis_images=0", f"data.cache_dir={tmp_path / 'c'}",
                 f"out_dir={run}"]) == 0
    checkpoint = str(run / "checkpoints" / "checkpoint-00000001.pt")
    assert main(["export", checkpoint, "--to", "timm", "--out", str(tmp_path / "vit-timm")]) == 0
    return tmp_path / "vit-timm", checkpoint


def test_timm_folder_has_what_timm_local_dir_reads_and_the_run_normalisation(tmp_path):
    """config.json (a registered architecture, model_args that rebuild this encoder, the run's mean/std
    in pretrained_cfg) + model.safetensors with timm's names."""
    folder, checkpoint = _timm_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224"
    assert config["model_args"] == dict(img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=1, num_heads=3,
                                        mlp_ratio=4.0, qkv_bias=True, init_values=None, num_classes=0,
                                        global_pool="token", class_token=True)
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])  # the recipe's, not ImageNet's
    assert cfg["std"] == pytest.approx([0.2470, 0.2435, 0.2616])
    state = read_state(folder / "model.safetensors")
    encoder = mimkit.load(checkpoint).encoder_state_dict()
    assert state.keys() == encoder.keys() and all(torch.equal(state[k], encoder[k]) for k in state)


def test_timm_loads_the_folder_with_equal_features(tmp_path):
    """Runs where timm imports (it needs torchvision, which does not import beside the CPU wheel of
    the development machine; the GPU machine has both)."""
    timm = pytest.importorskip("timm")
    folder, checkpoint = _timm_folder(tmp_path)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(imgs), mimkit.load(checkpoint).forward_features(imgs),
                                   atol=1e-5, rtol=0)
