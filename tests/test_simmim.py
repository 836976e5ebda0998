"""SimMIM: parity with transformers' ViTForMaskedImageModeling, its block masks, and training, resume,
pictures, evaluation and export through the shared paths (no change outside models/ and masking)."""

import json
import math

import pytest
import torch
from resumed import equal_weights, interrupt_and_resume
from test_cae import _randomize

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.export import mae_to_hf
from mimkit.masking import block_random_mask
from mimkit.models import build_model

TINY = dict(preset="simmim_vit_tiny_cifar_patch4", depth=2)
RECIPE = "configs/pretrain/simmim_vit_tiny_cifar10.yaml"


def _pair():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = _randomize(build_model("simmim", TINY), seed=3).eval()
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                                 image_size=32, patch_size=4, num_channels=3, encoder_stride=4, layer_norm_eps=1e-6,
                                 qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref = transformers.ViTForMaskedImageModeling(cfg).eval()
    state = mae_to_hf(ours.encoder_state_dict(), prefix="vit.")
    state |= {"vit.embeddings.mask_token": ours.mask_token.data, "decoder.0.weight": ours.decoder_pred.weight.data,
              "decoder.0.bias": ours.decoder_pred.bias.data}
    ref.load_state_dict(state, strict=True)
    return ours, ref


def test_loss_reconstruction_and_gradients_match_transformers():
    ours, ref = _pair()
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, 32, 32, generator=g)
    mask = ours.make_mask(3, generator=g)
    out = ours(imgs, mask=mask)
    r = ref(pixel_values=imgs, bool_masked_pos=mask)
    torch.testing.assert_close(out.loss, r.loss, atol=1e-5, rtol=0)
    from mimkit.targets import patchify

    torch.testing.assert_close(out.pred, patchify(r.reconstruction, 4), atol=1e-5, rtol=0)
    out.loss.backward()
    r.loss.backward()
    ours_grad, ref_grad = ours.blocks[0].attn.qkv.weight.grad, ref.vit.layers[0].attention.q_proj.weight.grad
    torch.testing.assert_close(ours_grad[:192], ref_grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours.mask_token.grad.view(-1), ref.vit.embeddings.mask_token.grad.view(-1),
                               atol=1e-6, rtol=1e-4)


def test_block_masks_are_whole_blocks_at_the_ratio_and_uniform():
    g = torch.Generator().manual_seed(0)
    mask = block_random_mask(4000, 8, 2, 0.6, generator=g)  # 4 x 4 blocks of 2 x 2 patches
    blocks = mask.view(4000, 4, 2, 4, 2)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # each block all masked or all visible
    assert (mask.sum(1) == 4 * math.ceil(16 * 0.6)).all()  # 10 of 16 blocks, every image
    per_block = blocks[:, :, 0, :, 0].float().mean(0)  # each block masked with probability 10/16
    assert (per_block - 10 / 16).abs().max() < 0.03
    assert len({tuple(m.tolist()) for m in mask[:100]}) == 100
    assert torch.equal(mask, block_random_mask(4000, 8, 2, 0.6, generator=torch.Generator().manual_seed(0)))


def test_config_checks_the_mask_block_size():
    with pytest.raises(ConfigError, match=r"^model.mask_patch_size: must be a multiple of model.patch_size \(4\), "
                                          r"got 6$"):
        build_model("simmim", TINY, mask_patch_size=6)
    with pytest.raises(ConfigError, match=r"^model.mask_patch_size: 64 does not divide model.img_size 32$"):
        build_model("simmim", TINY, mask_patch_size=64)


def test_training_resume_pictures_evaluation_and_export_through_the_shared_paths(tmp_path):
    args = ["pretrain", RECIPE, "model.depth=2", "train.batch_size=32", "train.epochs=4", "data.limit=256",
            "train.ckpt_every=8", "train.log_every=4", "train.vis_images=2", "train.max_steps=24",
            "train.warmup_epochs=1"]
    assert main([*args, f"out_dir={tmp_path / 'full'}"]) == 0
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < 0.92 * losses[0]  # 0.83 -> 0.73 in 24 steps here
    assert (tmp_path / "full" / "pictures" / "recon-00000024.png").is_file()

    from mimkit.config import load_config

    interrupt_and_resume(load_config(RECIPE, [*args[2:], f"out_dir={tmp_path / 'cut'}"]), 13)
    a = equal_weights(tmp_path / "full", tmp_path / "cut", 24)

    ckpt = str(tmp_path / "full" / "checkpoints" / "checkpoint-00000024.pt")
    assert main(["eval", "knn", ckpt, "data.limit=200", f"out_dir={tmp_path / 'knn'}"]) == 0
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert 14 < result["top1"] <= 100  # percent; chance is 10 (21.8 here)
    assert main(["export", ckpt, "--to", "timm", "--out", str(tmp_path / "enc.pth")]) == 0
    encoder = torch.load(tmp_path / "enc.pth", weights_only=True)
    assert torch.equal(encoder["pos_embed"], a["pos_embed"]) and "mask_token" not in encoder
