"""data2vec 2.0: inverse block masks, one step against a hand-written reference, the EMA teacher, resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from resumed import equal_weights, interrupt_and_resume

from mimkit.cli import main
from mimkit.config import ConfigError, load_config
from mimkit.masking import inverse_block_mask
from mimkit.models import build_model
from mimkit.train.optim import build_adamw

RECIPE = "configs/pretrain/data2vec2_vit_tiny_cifar10.yaml"


def _official_mask(B, L, mask_prob=0.8, mask_length=3, adjust=0.07):
    """fairseq's `compute_block_mask_2d(inverse_mask=True, require_same_masks=True)`, restated (torch RNG)."""
    d = int(L**0.5)
    keep = 1 - mask_prob
    mask = torch.zeros(B, d, d)
    inds = torch.randint(0, L, (B, int(L * ((keep + adjust) / mask_length**2))))
    mask.view(B, -1).scatter_(1, inds, 1)
    centers = mask.nonzero(as_tuple=True)
    i0, i1, i2 = [], [], []
    for i in range(mask_length):
        for j in range(mask_length):
            i0.append(centers[0])
            i1.append(centers[1] + i - mask_length // 2)
            i2.append(centers[2] + j - mask_length // 2)
    mask[(torch.cat(i0), torch.cat(i1).clamp(0, d - 1), torch.cat(i2).clamp(0, d - 1))] = 1
    mask = mask.view(B, -1)
    target = int(L * keep)
    for m in mask:
        n = int(m.sum())
        if n > target:
            m[torch.multinomial(m, n - target, replacement=False)] = 0
        elif n < target:
            m[torch.multinomial(1 - m, target - n, replacement=False)] = 1
    return (1 - mask).bool()


def _neighbours(visible, d):
    """Mean number of visible 4-neighbours of a visible patch."""
    v = visible.view(-1, 1, d, d).float()
    kernel = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float).view(1, 1, 3, 3)
    return ((F.conv2d(v, kernel, padding=1) * v).sum() / v.sum()).item()


def test_inverse_block_masks_follow_fairseq():
    torch.manual_seed(0)
    ours = inverse_block_mask(4000, (14, 14), generator=torch.Generator().manual_seed(0))
    ref = _official_mask(4000, 196)
    assert ours.shape == (4000, 196) and ours.sum(1).eq(157).all() and ref.sum(1).eq(157).all()  # 39 visible
    assert abs(_neighbours(~ours, 14) - _neighbours(~ref, 14)) < 0.05
    scattered = torch.rand(4000, 196).argsort(1).argsort(1) < 39  # 39 visible anywhere
    assert _neighbours(~ours, 14) > 2 * _neighbours(scattered, 14)  # blocks, not dots
    assert torch.allclose((~ours).float().mean(0), (~ref).float().mean(0), atol=0.03)  # borders too (clamping)
    wide = inverse_block_mask(8, (6, 10), generator=torch.Generator().manual_seed(1))
    assert wide.sum(1).eq(60 - 11).all()  # int(60 * (1 - 0.8)) = 11 in floating point, as in fairseq


def _block(x, blk):
    """A pre-norm block written out; returns its output and its FFN branch."""
    B, L, D = x.shape
    H = blk.attn.num_heads
    lin = lambda t, m: t @ m.weight.T + m.bias  # noqa: E731
    q, k, v = lin(F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, 1e-6), blk.attn.qkv).view(
        B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
    x = x + lin((torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), -1) @ v).transpose(1, 2).reshape(B, L, D),
                blk.attn.proj)
    ffn = lin(F.gelu(lin(F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, 1e-6), blk.mlp.fc1)), blk.mlp.fc2)
    return x + ffn, ffn


def _reference_loss(model, imgs, mask, noise):
    """fairseq's Data2VecMultiModel.forward for images (make_targets, clone_batch, Decoder2d, d2v_loss, cls)."""
    c, (h, w), D = model.cfg, model.patch_embed.grid_size, model.embed_dim
    t = model.teacher

    def embed(vit, x):
        x = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=vit.patch_size)
        return x.flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]

    with torch.no_grad():
        x = torch.cat([(t.cls_token + t.pos_embed[:, :1]).expand(len(imgs), -1, -1), embed(t, imgs)], 1)
        layers = []
        for blk in t.blocks:
            x, ffn = _block(x, blk)
            y = ffn[:, 1:]
            layers.append((y - y.mean(1, keepdim=True)) / (y.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt())
        y = sum(layers[-c.average_top_k:]) / c.average_top_k
        y = (y - y.mean(-1, keepdim=True)) / (y.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        y = y.repeat_interleave(c.num_masks, 0)
    tokens = embed(model, imgs).repeat_interleave(c.num_masks, 0)
    V = tokens.shape[0]
    x = torch.stack([tokens[i][~mask[i]] for i in range(V)])
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(V, -1, -1), x], 1)
    for blk in model.blocks:
        x, _ = _block(x, blk)
    x = F.layer_norm(x, (D,), model.norm.weight, model.norm.bias, 1e-6)
    grid = torch.zeros(V, h * w, D)
    for i in range(V):
        grid[i, ~mask[i]] = x[i, 1:]
        grid[i, mask[i]] = noise[i]
    z = grid.transpose(1, 2).reshape(V, D, h, w)
    for conv in model.decoder.convs:
        r = F.conv2d(z, conv.weight, conv.bias, padding=conv.kernel_size[0] // 2, groups=conv.groups)
        r = F.gelu(F.layer_norm(r.permute(0, 2, 3, 1), (r.shape[1],)).permute(0, 3, 1, 2))
        z = r + z if r.shape == z.shape else r
    pred = z.flatten(2).transpose(1, 2) @ model.decoder.proj.weight.T + model.decoder.proj.bias
    regression = ((pred - y) ** 2)[mask].sum() / math.sqrt(D) / mask.sum()
    cls = ((x[:, 0] - y.mean(1)) ** 2).sum() / math.sqrt(D)
    return regression + c.cls_loss * cls


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(preset="data2vec2_vit_tiny_cifar_patch4", depth=3, average_top_k=2, num_masks=2, decoder_layers=2,
                decoder_dim=96)
    return build_model("data2vec2", **{**args, **kw})


def test_one_step_matches_a_hand_written_reference_and_the_teacher_follows_the_ema():
    model = _tiny()
    with torch.no_grad():
        for p in model.teacher.parameters():  # a teacher apart from the student, so that mixing them up shows
            p.add_(0.05 * torch.randn_like(p))
    imgs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = model.make_mask(6, torch.Generator().manual_seed(2))
    noise = 0.01 * torch.randn(6, int(mask[0].sum()), 192, generator=torch.Generator().manual_seed(3))
    out = model(imgs, mask=mask, noise=noise)
    torch.testing.assert_close(out.loss, _reference_loss(model, imgs, mask, noise), atol=1e-5, rtol=1e-5)
    assert out.views.shape == (6, 64) and out.views.sum(1).eq(52).all() and torch.equal(out.mask, mask[::2])

    optimizer = build_adamw(model, 1e-3, 0.05, (0.9, 0.95))
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not {id(p) for p in model.teacher.parameters()} & trained
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and model.decoder.convs[0].weight.grad is not None
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    optimizer.step()
    decay = model.decay(1, 100)  # fairseq's get_annealed_rate after update 1 of a 27-update anneal
    assert decay == pytest.approx(0.99999 - (0.99999 - 0.9998) * (1 - 1 / 27))
    model.after_step(1, 100)
    student = dict(model.named_parameters())
    for name, t in model.teacher.named_parameters():
        if student[name].requires_grad:
            torch.testing.assert_close(t, decay * before[name] + (1 - decay) * student[name], atol=1e-7, rtol=0)
    assert model.decay(27, 100) == model.decay(100, 100) == 0.99999


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="model.average_top_k: 13 is more than model.depth=12"):
        build_model("data2vec2", preset="data2vec2_vit_tiny_cifar_patch4", average_top_k=13)
    with pytest.raises(ConfigError, match="model.decoder_dim: 100 is not divisible by model.decoder_groups=16"):
        build_model("data2vec2", preset="data2vec2_vit_tiny_cifar_patch4", decoder_dim=100)


def test_training_resumes_exactly_with_its_teacher_and_goes_through_the_shared_paths(tmp_path):
    args = ["model.depth=2", "model.average_top_k=2", "model.num_masks=2", "train.batch_size=16", "train.epochs=4",
            "data.limit=128", "train.ckpt_every=6", "train.log_every=3", "train.vis_images=2", "train.max_steps=12",
            "train.warmup_epochs=1"]
    assert main(["pretrain", RECIPE, *args, f"out_dir={tmp_path / 'full'}"]) == 0
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert "regression" in records[0] and (tmp_path / "full" / "pictures" / "recon-00000012.png").is_file()

    interrupt_and_resume(load_config(RECIPE, [*args, f"out_dir={tmp_path / 'cut'}"]), 7)
    a = equal_weights(tmp_path / "full", tmp_path / "cut", 12)
    assert any(k.startswith("teacher.") for k in a)

    ckpt = str(tmp_path / "full" / "checkpoints" / "checkpoint-00000012.pt")
    assert main(["eval", "knn", ckpt, "data.limit=200", f"out_dir={tmp_path / 'knn'}"]) == 0
    assert 0 <= json.loads((tmp_path / "knn" / "results.json").read_text())["top1"] <= 100
    assert main(["export", ckpt, "--to", "timm", "--out", str(tmp_path / "enc.pth")]) == 0
    encoder = torch.load(tmp_path / "enc.pth", weights_only=True)
    assert torch.equal(encoder["blocks.0.attn.qkv.weight"], a["blocks.0.attn.qkv.weight"]) and "decoder.proj.weight" \
        not in encoder
