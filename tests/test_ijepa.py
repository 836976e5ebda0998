"""I-JEPA: multi-block masks, one step against a hand-written reference, the EMA teacher, resume, shared paths."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from resumed import equal_weights, interrupt_and_resume

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.masking import jepa_block_size, multiblock_masks
from mimkit.models import build_model
from mimkit.train.optim import build_adamw

RECIPE = "configs/pretrain/ijepa_vit_tiny_cifar10.yaml"


def test_multiblock_masks_follow_the_official_collator():
    grid, g = (14, 14), torch.Generator().manual_seed(0)
    sizes = [jepa_block_size(grid, (0.15, 0.2), (0.75, 1.5), g) for _ in range(2000)]
    areas = torch.tensor([h * w for h, w in sizes], dtype=torch.float64) / 196
    assert 0.11 < areas.min() and areas.max() < 0.25 and abs(areas.mean() - 0.175) < 0.01  # sides are rounded
    ratios = torch.tensor([h / w for h, w in sizes])
    assert ratios.min() >= 0.6 and ratios.max() <= 1.8 and (ratios > 1).float().mean() > 0.5  # uniform in 0.75-1.5
    assert {jepa_block_size(grid, (0.85, 1.0), (1.0, 1.0), g) for _ in range(200)} <= {(13, 13)}  # sides < 14

    covered = torch.zeros(196)
    for seed in range(30):
        context, targets = multiblock_masks(16, grid, generator=torch.Generator().manual_seed(seed))
        assert targets.shape[:2] == (4, 16) and context.shape[0] == 16 and context.shape[1] > 10
        h, w = [(a, b) for a, b in [jepa_block_size(grid, (0.15, 0.2), (0.75, 1.5),
                                                     torch.Generator().manual_seed(seed))]][0]
        assert targets.shape[2] == h * w  # whole blocks: every target of a batch has one size
        for i in range(16):
            for t in targets[:, i]:
                rows, cols = t // 14, t % 14
                assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == h * w  # a rectangle
                covered[t] += 1
            assert not set(context[i].tolist()) & set(targets[:, i].flatten().tolist())  # targets removed
            assert context[i].tolist() == sorted(context[i].tolist())
    # top and left are drawn in [0, 14 - h) as the official code does: no target reaches the last row
    assert covered.view(14, 14)[-1].sum() == 0 and covered.view(14, 14)[:, -1].sum() == 0
    assert covered.view(14, 14)[:-1, :-1].min() > 0


def _linear(x, layer):
    return x @ layer.weight.T + layer.bias


def _block(x, blk):
    """One pre-norm ViT block, written out: LN, qkv, softmax attention, projection, LN, GELU MLP."""
    B, L, D = x.shape
    H = blk.attn.num_heads
    q, k, v = _linear(F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, 1e-6), blk.attn.qkv).view(
        B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1) @ v
    x = x + _linear(a.transpose(1, 2).reshape(B, L, D), blk.attn.proj)
    h = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    return x + _linear(F.gelu(_linear(h, blk.mlp.fc1)), blk.mlp.fc2)


def _encode(vit, imgs, ids=None):
    """A ViT's patch embedding, positions, optional gather of `ids`, cls, blocks and final norm, written out."""
    x = F.conv2d(imgs, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=4).flatten(2).transpose(1, 2)
    x = x + vit.pos_embed[:, 1:]
    if ids is not None:
        x = torch.stack([x[b, ids[b]] for b in range(x.shape[0])])
    x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], 1)
    for blk in vit.blocks:
        x = _block(x, blk)
    return F.layer_norm(x, (x.shape[-1],), vit.norm.weight, vit.norm.bias, 1e-6)


def _reference_loss(model, imgs, context, targets):
    """The official train step's loss (src/train.py: forward_target, forward_context, loss_fn)."""
    B, T = imgs.shape[0], targets.shape[0]
    with torch.no_grad():
        h = _encode(model.target_encoder, imgs)[:, 1:]
        h = F.layer_norm(h, (h.shape[-1],))
        h = torch.cat([torch.stack([h[b, targets[j, b]] for b in range(B)]) for j in range(T)])
    z = _encode(model, imgs, context)[:, 1:]
    pos = model.predictor_pos_embed[0]
    x = _linear(z, model.predictor_embed) + torch.stack([pos[context[b]] for b in range(B)])
    x = x.repeat(T, 1, 1)  # repeat_interleave_batch: every target's copy of the batch
    queries = model.mask_token + torch.cat([torch.stack([pos[targets[j, b]] for b in range(B)]) for j in range(T)])
    x = torch.cat([x, queries], 1)
    for blk in model.predictor_blocks:
        x = _block(x, blk)
    n = model.predictor_norm
    x = F.layer_norm(x, (x.shape[-1],), n.weight, n.bias, 1e-6)[:, context.shape[1]:]
    return ((_linear(x, model.predictor_proj) - h) ** 2).mean()


def _tiny(**kw):
    torch.manual_seed(0)
    return build_model("ijepa", preset="ijepa_vit_tiny_cifar_patch4", depth=2, predictor_depth=2, **kw)


def test_one_step_matches_a_hand_written_reference_and_the_teacher_follows_the_ema():
    model = _tiny()
    with torch.no_grad():  # a teacher apart from the student, so that mixing them up would show
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    imgs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    masks = model.make_masks(3, torch.Generator().manual_seed(2))
    out = model(imgs, masks=masks)
    ref = _reference_loss(model, imgs, *masks)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    assert out.mask.shape == (3, 64) and (~out.mask).sum(1).tolist() == [masks[0].shape[1]] * 3

    optimizer = build_adamw(model, 1e-3, 0.04, (0.9, 0.999))
    assert not {id(p) for p in model.target_encoder.parameters()} & {id(p) for g in optimizer.param_groups
                                                                        for p in g["params"]}
    out.loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())  # no gradient into the teacher
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and model.predictor_embed.weight.grad is not None
    teacher = {k: v.clone() for k, v in model.target_encoder.state_dict().items()}
    optimizer.step()
    model.after_step(1, 10)  # momentum 0.996 at the first of 10 steps
    student = dict(model.named_parameters())
    for name, t in model.target_encoder.named_parameters():
        if student[name].requires_grad:
            torch.testing.assert_close(t, 0.996 * teacher[name] + 0.004 * student[name], atol=1e-6, rtol=0)
        else:  # the fixed sin-cos positions are copied
            assert torch.equal(t, student[name]) and name == "pos_embed"
    assert model.momentum(10, 10) == pytest.approx(0.996 + 9 * 0.004 / 10)
    assert model.momentum(11, 10) == pytest.approx(1.0)


def test_evaluation_and_export_see_the_target_encoder():
    model = _tiny()
    with torch.no_grad():
        model.target_encoder.blocks[0].mlp.fc1.weight.add_(1.0)
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.forward_features(imgs), model.target_encoder.forward_features(imgs))
    exported = model.encoder_state_dict()["blocks.0.mlp.fc1.weight"]
    assert torch.equal(exported, model.target_encoder.blocks[0].mlp.fc1.weight)
    assert not any(k.startswith(("predictor", "mask_token", "target_encoder")) for k in model.encoder_state_dict())


def test_training_resumes_exactly_with_its_teacher_and_goes_through_the_shared_paths(tmp_path):
    args = ["model.depth=2", "model.predictor_depth=2", "train.batch_size=32", "train.epochs=4", "data.limit=256",
            "train.ckpt_every=8", "train.log_every=4", "train.vis_images=2", "train.max_steps=24",
            "train.warmup_epochs=1"]
    assert main(["pretrain", RECIPE, *args, f"out_dir={tmp_path / 'full'}"]) == 0
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert (tmp_path / "full" / "pictures" / "recon-00000024.png").is_file()

    interrupt_and_resume(load_config(RECIPE, [*args, f"out_dir={tmp_path / 'cut'}"]), 13)
    a = equal_weights(tmp_path / "full", tmp_path / "cut", 24)
    assert any(k.startswith("target_encoder.") for k in a)
    assert not torch.equal(a["target_encoder.blocks.0.attn.qkv.weight"], a["blocks.0.attn.qkv.weight"])

    ckpt = str(tmp_path / "full" / "checkpoints" / "checkpoint-00000024.pt")
    assert main(["eval", "knn", ckpt, "data.limit=200", "probe.pool=mean", f"out_dir={tmp_path / 'knn'}"]) == 0
    assert 0 <= json.loads((tmp_path / "knn" / "results.json").read_text())["top1"] <= 100
    assert main(["export", ckpt, "--to", "timm", "--out", str(tmp_path / "enc.pth")]) == 0
    encoder = torch.load(tmp_path / "enc.pth", weights_only=True)
    assert torch.equal(encoder["blocks.0.attn.qkv.weight"], a["target_encoder.blocks.0.attn.qkv.weight"])
