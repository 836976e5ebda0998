import math

import pytest
import torch

from mimkit.models import build_model
from mimkit.train.optim import build_adamw, cosine_lr, param_groups, set_lr


def _tiny():
    torch.manual_seed(0)
    return build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=2, decoder_depth=1)


def test_no_weight_decay_on_norms_biases_and_tokens():
    groups = param_groups(_tiny(), weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] == 0.05 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0.0 for n in g["names"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "decoder_pred.weight" in decayed
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"} <= plain
    # fixed sin-cos position embeddings are not trained at all during pretraining
    assert "pos_embed" not in decayed | plain and "decoder_pos_embed" not in decayed | plain
    assert all(n.endswith(".bias") or "norm" in n or n in ("cls_token", "mask_token") for n in plain)


def test_layer_decay_scales():
    model = _tiny()  # 2 blocks -> layers 0 (embeddings), 1, 2, 3 (head side)
    scales = {n: g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=0.5) for n in g["names"]}
    assert scales["cls_token"] == 0.5**3 and scales["patch_embed.proj.weight"] == 0.5**3
    assert scales["blocks.0.mlp.fc1.weight"] == 0.5**2 and scales["blocks.1.norm1.weight"] == 0.5
    assert scales["norm.weight"] == 1.0


def test_schedule_warmup_then_half_cosine():
    assert cosine_lr(0, 100, 10, 1.0) == 0.0
    assert cosine_lr(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert cosine_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_lr(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_set_lr_applies_scale():
    opt = build_adamw(_tiny(), lr=1.0, weight_decay=0.05, betas=(0.9, 0.95), layer_decay=0.5)
    set_lr(opt, 2.0)
    assert sorted({g["lr"] for g in opt.param_groups}) == [0.25, 0.5, 1.0, 2.0]
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
