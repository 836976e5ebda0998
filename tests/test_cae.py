"""CAE: shapes, gradients, the alignment target, the regressor's attention, official weights, tokens,
pictures, and training through the shared loop (loss down, exact resume, unreadable files)."""

import math
import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mimkit
from mimkit.config import ConfigError, load_config
from mimkit.convert import WeightsError, cae_config_from_official, cae_from_official, is_official_cae, read_state
from mimkit.export import export
from mimkit.metrics import read_metrics
from mimkit.models import build_model
from mimkit.models.vit import VisionTransformer
from mimkit.targets import patchify, pixel_target, token_target
from mimkit.tokenizers import build_tokenizer, read_weights
from mimkit.tokenizers.dalle import DalleTokenizer
from mimkit.train import checkpoint
from mimkit.train.loop import pretrain
from mimkit.viz import reconstruction_grid

# A CAE small enough to reason about by hand: 16 px, patch 4 (4 x 4 grid), width 16, 2 heads.
TOY = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, decoder_embed_dim=16,
           decoder_num_heads=2, regressor_depth=2, decoder_depth=1, target="pixels", drop_path_rate=0.0)


def _toy(**kw):
    torch.manual_seed(0)
    return build_model("cae", TOY | kw)


def _randomize(model, seed=0):
    """Every parameter random (LayerNorms, biases, LayerScale, tokens), so no term hides behind a zero or a one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.5 if p.ndim > 1 else 0.3
                centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * scale + centre)
    return model


def _imgs(b=2, size=16, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- shapes and presets


@pytest.mark.parametrize("preset, width, depth, heads, encoder_params", [
    ("cae_vit_small_patch16", 384, 12, 12, 21_594_624),
    ("cae_vit_base_patch16", 768, 12, 12, 85_656_576),   # ViT-B/16 with q/v biases and LayerScale: 86M
    ("cae_vit_large_patch16", 1024, 24, 16, 303_124_480),
])
def test_preset_shapes_on_the_meta_device(preset, width, depth, heads, encoder_params):
    with torch.device("meta"):
        model = build_model("cae", preset=preset)
        tokenizer = build_tokenizer("dalle", "random")
    model.set_tokenizer(tokenizer)
    assert (model.embed_dim, len(model.blocks), model.num_heads) == (width, depth, heads)
    assert len(model.regressor_blocks) == 4 and len(model.decoder_blocks) == 4  # CAE: 4 + 4
    out = model(torch.empty(2, 3, 224, 224, device="meta"), generator=torch.Generator().manual_seed(0))
    assert out.mask.shape == (2, 196) and out.pred.shape == (2, 98, 8192)  # 98 of 196 masked, DALL-E logits
    assert out.latent_pred.shape == out.latent_target.shape == (2, 98, model.cfg.decoder_embed_dim)
    assert out.loss.shape == () and set(out.logs) == {"loss_recon", "loss_align", "acc"}
    assert sum(v.numel() for k, v in model.encoder_state_dict().items() if k != "pos_embed") == encoder_params
    assert model.blocks[0].attn.q_bias is not None and model.blocks[0].attn.qkv.bias is None  # no k bias
    assert model.blocks[0].ls1.gamma.shape == (width,)


def test_cifar_tiny_encoder_sees_visible_then_masked_patches_only():
    torch.manual_seed(0)
    model = build_model("cae", preset="cae_vit_tiny_cifar_patch4")
    assert model.cfg.mask_type == "block" and model.cfg.target == "pixels" and model.cfg.norm_pix_loss
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    out = model(torch.randn(3, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert seen == [(3, 33, 192), (3, 33, 192)]  # cls + 32 visible (with grad), cls + 32 masked (target)
    assert out.pred.shape == (3, 32, 48) and out.mask.sum(1).tolist() == [32] * 3
    visible = model.patch_embed.num_patches - out.mask.sum(1)
    assert visible.tolist() == [32] * 3 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="expected images of 3 x 32 x 32"):
        model(torch.randn(1, 3, 64, 64))


def test_config_is_checked():
    with pytest.raises(ConfigError, match=r"^model.target: 'pixel' is not one of tokens, pixels$"):
        build_model("cae", target="pixel")
    with pytest.raises(ConfigError, match=r"^model.mask_ratio: must be in \(0, 1\)"):
        build_model("cae", mask_ratio=1.0)
    with pytest.raises(ConfigError, match=r"^model.regresor_depth: unknown key; did you mean model.regressor_depth\?"):
        build_model("cae", regresor_depth=2)


# --------------------------------------------------------------------------- the algorithm


def test_loss_is_reconstruction_plus_weighted_alignment():
    model = _toy(norm_pix_loss=True, align_weight=2.0)
    imgs = _imgs()
    out = model(imgs, generator=torch.Generator().manual_seed(0))
    target = pixel_target(imgs, 4, norm_pix=True)[out.mask].view(2, -1, 48)  # masked patches, grid order
    recon = F.mse_loss(out.pred, target)
    align = F.mse_loss(out.latent_pred, out.latent_target)
    torch.testing.assert_close(out.logs["loss_recon"], recon)
    torch.testing.assert_close(out.logs["loss_align"], align)
    torch.testing.assert_close(out.loss, recon + 2.0 * align)


def test_gradient_reaches_the_encoder_from_both_losses_and_never_the_target():
    model = _randomize(_toy())
    imgs = _imgs().requires_grad_(True)
    out = model(imgs, generator=torch.Generator().manual_seed(0))
    assert not out.latent_target.requires_grad and out.latent_target.grad_fn is None
    encoder = [p for n, p in model.named_parameters() if n.startswith(("blocks.", "patch_embed.")) and p.requires_grad]
    recon = F.mse_loss(out.pred, pixel_target(imgs.detach(), 4, False)[out.mask].view(2, -1, 48))
    align = F.mse_loss(out.latent_pred, out.latent_target)
    for loss in (recon, align):
        grads = torch.autograd.grad(loss, encoder + [imgs], retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads[:-1])  # every encoder tensor learns from this loss
        # The masked patches reach the losses only through the alignment target (no gradient) and the
        # reconstruction target (detached here): their pixels get no gradient at all.
        hidden = (patchify(grads[-1], 4).abs().sum(-1) > 0)
        assert not (hidden & out.mask).any() and (hidden & ~out.mask).any()


def _encoder_by_hand(model, imgs, mask):
    """The encoder run on the masked patches alone, written out: (B, M, D)."""
    B = imgs.shape[0]
    x = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
    x = x[mask].view(B, -1, x.shape[-1])  # official: x[bool_masked_pos]
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
    for blk in model.blocks:
        x = blk(x)
    return model.norm(x)[:, 1:]


@pytest.mark.parametrize("decoder_embed_dim", [16, 8])  # same width, and through the encoder -> regressor projection
def test_alignment_target_is_the_encoder_itself_on_the_masked_patches(decoder_embed_dim):
    model = _randomize(_toy(decoder_embed_dim=decoder_embed_dim)).eval()
    imgs = _imgs()
    project = model.to_regressor if decoder_embed_dim != 16 else (lambda x: x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # before and after an optimizer step: always the encoder's current weights
        out = model(imgs, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = project(_encoder_by_hand(model, imgs, out.mask))
        torch.testing.assert_close(out.latent_target, expected, atol=1e-5, rtol=1e-5)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    # no second copy of the encoder anywhere: not in parameters, not in the checkpoint
    state = model.state_dict()
    assert not any("align" in k for k in state)
    assert len(state) == len(dict(model.named_parameters())) + len(dict(model.named_buffers()))
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.parameters())


def _regressor_by_hand(model, latent, mask):
    """The latent contextual regressor of the official `LatentRegresser`, per image, per head, written out."""
    D = model.cfg.decoder_embed_dim
    H = model.cfg.decoder_num_heads
    d = D // H
    pos = model.decoder_pos_embed[0, 1:]

    def ln(norm, t):
        return F.layer_norm(t, (D,), norm.weight, norm.bias, eps=1e-6)

    outs = []
    for b in range(latent.shape[0]):
        visible, pos_q = latent[b, 1:], pos[mask[b]]
        pos_k = torch.cat([pos[~mask[b]], pos_q])
        x = model.mask_token[0].expand(int(mask[b].sum()), D)
        for blk in model.regressor_blocks:
            a = blk.attn
            kv = torch.cat([visible, x])  # keys and values: [visible latents, current masked-token states]
            q = ln(blk.norm_q, x + pos_q) @ a.q.weight.T + a.q_bias  # queries: masked states + their positions
            k = ln(blk.norm_k, kv + pos_k) @ a.k.weight.T  # keys: with positions, no key bias
            v = ln(blk.norm_v, kv) @ a.v.weight.T + a.v_bias  # values: without positions
            heads = [torch.softmax(q[:, h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T / math.sqrt(d), dim=-1)
                     @ v[:, h * d:(h + 1) * d] for h in range(H)]
            x = x + blk.ls1.gamma * (torch.cat(heads, 1) @ a.proj.weight.T + a.proj.bias)
            x = ln(blk.norm2, x)
            x = x + blk.ls2.gamma * (F.gelu(x @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T
                                     + blk.mlp.fc2.bias)
        outs.append(ln(model.regressor_norm, x))
    return torch.stack(outs)


def test_regressor_attention_matches_a_hand_built_reference():
    model = _randomize(_toy(), seed=3).eval()
    imgs = _imgs()
    ids_keep, ids_masked, _, mask = model.masking(imgs, generator=torch.Generator().manual_seed(0))
    latent = model.forward_encoder(imgs, ids_keep)
    with torch.no_grad():
        ours = model.forward_regressor(latent, ids_keep, ids_masked)
        ref = _regressor_by_hand(model, latent, mask)
    assert ours.shape == (2, 8, 16)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # the reference is sensitive to what it pins: keys without positions would give another answer
    with torch.no_grad():
        model.decoder_pos_embed.mul_(3)
        assert not torch.allclose(model.forward_regressor(latent, ids_keep, ids_masked), ours, atol=1e-3)


def test_explicit_mask_and_random_masking():
    model = _toy().eval()
    imgs = _imgs()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :8] = True  # the top half
    out = model(imgs, mask=mask)
    assert torch.equal(out.mask, mask) and out.pred.shape == (2, 8, 48)
    with pytest.raises(ValueError, match="same count in every row"):
        model(imgs, mask=torch.eye(2, 16, dtype=torch.bool) | torch.tensor([[False] * 15 + [True], [False] * 16]))
    rnd = _toy(mask_type="random").eval()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    a, b = rnd(imgs, noise=noise), rnd(imgs, noise=noise)
    assert torch.equal(a.mask, b.mask) and a.mask.sum(1).tolist() == [8, 8] and torch.equal(a.loss, b.loss)


# --------------------------------------------------------------------------- token targets


def test_token_targets_use_cross_entropy_on_the_tokenizer_codes():
    torch.manual_seed(0)
    model = build_model("cae", preset="cae_vit_tiny_cifar_patch4", depth=1, regressor_depth=1, decoder_depth=1,
                        target="tokens", tokenizer_weights="random")
    assert model.decoder_pred.out_features == 8192
    imgs = torch.randn(2, 3, 32, 32)
    out = model(imgs, generator=torch.Generator().manual_seed(0))  # builds the random tokenizer on first use
    tokenizer = model.tokenizer()
    codes = token_target(imgs, tokenizer, (8, 8), model.cfg.image_mean, model.cfg.image_std)  # 64 px for an 8 x 8 grid
    assert codes.shape == (2, 64) and codes.dtype == torch.int64
    labels = codes[out.mask].view(2, 32)
    torch.testing.assert_close(out.logs["loss_recon"], F.cross_entropy(out.pred.flatten(0, 1), labels.flatten()))
    assert 0 <= out.logs["acc"] <= 1
    # the frozen tokenizer is not part of the model: not trained, not saved
    assert not any(k.startswith("_tokenizer") or "blocks.group" in k for k in model.state_dict())
    assert all(not p.requires_grad for p in tokenizer.parameters())
    assert sum(p.numel() for p in model.parameters()) < 10_000_000  # the 54M-parameter tokenizer is not counted


def test_tokens_without_weights_say_what_to_set():
    model = build_model("cae", preset="cae_vit_tiny_cifar_patch4", depth=1, target="tokens")
    with pytest.raises(ValueError, match="set model.tokenizer_weights to a path or URL"):
        model(torch.randn(1, 3, 32, 32))


def test_dalle_tokenizer_has_the_official_names_and_loads_the_official_pickle(tmp_path, monkeypatch):
    with torch.device("meta"):
        tok = DalleTokenizer()
    shapes = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    # names and shapes of openai/DALL-E `dall_e/encoder.py` (n_hid 256, 2 blocks per group, 8192 codes)
    assert shapes["blocks.input.w"] == (256, 3, 7, 7) and shapes["blocks.input.b"] == (256,)
    assert shapes["blocks.group_1.block_1.res_path.conv_1.w"] == (64, 256, 3, 3)
    assert shapes["blocks.group_2.block_1.id_path.w"] == (512, 256, 1, 1)
    assert shapes["blocks.group_4.block_2.res_path.conv_4.w"] == (2048, 512, 1, 1)
    assert shapes["blocks.output.conv.w"] == (8192, 2048, 1, 1) and len(shapes) == 2 + 4 * 2 * 8 + 3 * 2 + 2

    # `encoder.pkl` is a whole pickled `dall_e.encoder.Encoder`; imitate one with a small stand-in
    # whose classes live in a `dall_e` package, then load it without that package installed.
    small = DalleTokenizer(n_hid=64, n_blk_per_group=1, vocab_size=512)
    pkg, enc, utils = (types.ModuleType(n) for n in ("dall_e", "dall_e.encoder", "dall_e.utils"))
    fakes = {}
    classes = ((enc, type(small)), (enc, type(small.blocks.group_1.block_1)), (utils, type(small.blocks.input)))
    for module, cls in classes:
        name = {"DalleTokenizer": "Encoder"}.get(cls.__name__, cls.__name__)
        fake = type(name, (cls,), {"__module__": module.__name__})
        setattr(module, name, fake)
        fakes[cls] = fake
    for m in small.modules():
        if type(m) in fakes:
            m.__class__ = fakes[type(m)]
    for mod in (pkg, enc, utils):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    path = tmp_path / "encoder.pkl"
    torch.save(small, path)
    for mod in (pkg, enc, utils):
        monkeypatch.delitem(sys.modules, mod.__name__)
    with pytest.raises((ModuleNotFoundError, pickle.UnpicklingError, AttributeError)):
        torch.load(path, weights_only=False)  # the official package is not needed ...
    state = read_weights(path)  # ... to read the tensors
    assert state.keys() == small.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in small.state_dict().items())
    # and through a URL into the cache (file:// here; http(s) the same way)
    loaded = build_tokenizer("dalle", "random")
    assert sum(p.numel() for p in loaded.parameters()) == 53_786_240
    fetched = read_weights(__import__("mimkit.tokenizers", fromlist=["fetch"]).fetch(path.as_uri(), tmp_path / "cache"))
    assert fetched.keys() == state.keys() and (tmp_path / "cache" / "tokenizers" / "encoder.pkl").is_file()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_tokenizer_file_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "encoder.pkl"
    torch.save({"w": torch.zeros(2), "hook": _Payload()}, path)
    with pytest.raises(WeightsError, match=r"encoder.pkl: refusing to unpickle (posix|os)\.system"):
        read_weights(path)
    torch.save({"blocks.input.w": torch.ones(2)}, path)  # a plain state dict still reads
    assert torch.equal(read_weights(path)["blocks.input.w"], torch.ones(2))


# --------------------------------------------------------------------------- official weights


def _to_official(state):
    """mimkit CAE names -> the official Atten4Vis/CAE pretraining names, written out independently."""
    blk = {"norm_q": "norm1_q", "norm_k": "norm1_k", "norm_v": "norm1_v", "norm2": "norm2_cross",
           "attn": "cross_attn", "mlp": "mlp_cross"}
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "regressor_blocks":
            rest = ".".join(parts[2:])
            rest = {"ls1.gamma": "gamma_1_cross", "ls2.gamma": "gamma_2_cross"}.get(rest, rest)
            head, _, tail = rest.partition(".")
            rest = f"{blk.get(head, head)}.{tail}" if tail else rest
            out[f"regresser.regressor_blocks.{parts[1]}.{rest}"] = v
        elif parts[0] in ("blocks", "decoder_blocks"):
            rest = ".".join(parts[2:]).replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")
            prefix = "encoder.blocks" if parts[0] == "blocks" else "decoder.decoder_blocks"
            out[f"{prefix}.{parts[1]}.{rest}"] = v
        elif parts[0] in ("patch_embed", "cls_token", "pos_embed", "norm"):
            out["encoder." + k] = v
        else:
            top = {"regressor_norm": "regresser.norm", "decoder_norm": "decoder.norm", "decoder_pred": "decoder.head",
                   "decoder_pos_embed": "rd_pos_embed", "encoder_to_regressor": "encoder_to_regresser",
                   "encoder_to_regressor_norm": "encoder_to_regresser_norm", "mask_token": "mask_token"}
            stem, _, leaf = k.partition(".")
            out[top[stem] + (f".{leaf}" if leaf else "")] = v
    return out


@pytest.mark.parametrize("decoder_embed_dim", [16, 8])
def test_official_checkpoint_loads(decoder_embed_dim):
    model = _randomize(_toy(decoder_embed_dim=decoder_embed_dim), seed=5).eval()
    official = _to_official(model.state_dict())
    for key in ("encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.attn.q_bias", "encoder.blocks.0.gamma_1",
                "regresser.regressor_blocks.1.cross_attn.v_bias", "regresser.regressor_blocks.0.gamma_2_cross",
                "regresser.norm.weight", "decoder.decoder_blocks.0.gamma_2", "decoder.head.weight", "rd_pos_embed",
                "mask_token"):
        assert key in official
    assert ("encoder_to_regresser.weight" in official) == (decoder_embed_dim != 16)
    # the official alignment encoder: a duplicate of the encoder, ignored
    official |= {"alignment_encoder." + k[len("encoder."):]: torch.randn_like(v)
                 for k, v in official.items() if k.startswith("encoder.")}
    checkpoint_file = {"model": official, "epoch": 299}
    state = checkpoint_file["model"]
    assert is_official_cae(state) and not is_official_cae(model.state_dict())
    cfg = cae_config_from_official(state)
    assert {k: cfg[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "decoder_embed_dim", "regressor_depth",
                                "decoder_depth", "target", "qv_bias")} == \
        dict(img_size=16, patch_size=4, embed_dim=16, depth=2, decoder_embed_dim=decoder_embed_dim, regressor_depth=2,
             decoder_depth=1, target="pixels", qv_bias=True)
    fresh = build_model("cae", cfg | dict(num_heads=2, decoder_num_heads=2)).eval()
    fresh.load_state_dict(cae_from_official(state), strict=True)
    imgs = _imgs()
    a = model(imgs, generator=torch.Generator().manual_seed(0))
    b = fresh(imgs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.pred, b.pred) and torch.equal(a.loss, b.loss)
    with pytest.raises(WeightsError, match="unknown official CAE keys: regresser.extra"):
        cae_from_official(state | {"regresser.extra": torch.zeros(1)})


# --------------------------------------------------------------------------- metadata, export, pictures


def test_encoder_exports_to_a_plain_vit_and_optimizer_metadata():
    model = _randomize(_toy(decoder_embed_dim=8)).eval()
    vit = VisionTransformer(**model.arch).eval()
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    imgs = _imgs()
    assert torch.equal(vit.forward_features(imgs), model.forward_features(imgs))
    assert model.no_weight_decay() == {"pos_embed", "decoder_pos_embed"}  # official CAE decays cls and mask tokens
    assert model.layer_id("blocks.1.attn.q_bias") == 2 and model.layer_id("regressor_blocks.0.attn.q.weight") == 3


def test_timm_export_folds_the_q_and_v_biases_into_a_plain_vit(tmp_path):
    model = _randomize(_toy(decoder_embed_dim=8)).eval()
    plain = VisionTransformer(**{**model.arch, "qv_bias": False})  # timm's ViT with LayerScale
    imgs = _imgs()
    for name in ("cae.pth", "cae.safetensors"):
        export(model, tmp_path / name, "timm")
        state = read_state(tmp_path / name)
        assert sorted(state) == sorted(plain.state_dict())  # qkv.bias, no q_bias / v_bias
        q_bias, v_bias = model.blocks[0].attn.q_bias, model.blocks[0].attn.v_bias
        assert torch.equal(state["blocks.0.attn.qkv.bias"], torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]))
        loaded = mimkit.load(tmp_path / name, num_heads=model.cfg.num_heads)
        torch.testing.assert_close(loaded.forward_features(imgs), model.forward_features(imgs), rtol=0, atol=1e-6)


def test_pictures_show_block_masks_and_the_masked_predictions_only():
    torch.manual_seed(0)
    model = build_model("cae", preset="cae_vit_tiny_cifar_patch4", depth=1, regressor_depth=1, decoder_depth=1)
    imgs = torch.randn(2, 3, 32, 32)
    grid = reconstruction_grid(model, imgs, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), seed=0)
    S = 128  # 32 px enlarged 4x
    assert grid.shape == (3, 2 * S, 4 * S)
    out = model.eval()(imgs, generator=torch.Generator().manual_seed(0))
    hidden = out.mask[0].view(8, 8).repeat_interleave(16, 0).repeat_interleave(16, 1)  # (128, 128)
    masked_cell, recon_cell = grid[:, :S, S:2 * S], grid[:, :S, 2 * S:3 * S]
    assert (masked_cell[:, hidden] == 0.5).all()  # grey: hidden from the encoder
    assert (recon_cell[:, ~hidden] == 0.5).all() and not (recon_cell[:, hidden] == 0.5).all()  # no prediction there
    tokens = build_model("cae", preset="cae_vit_tiny_cifar_patch4", depth=1, regressor_depth=1, decoder_depth=1,
                         target="tokens", tokenizer_weights="random")
    assert reconstruction_grid(tokens, imgs, (0.5,) * 3, (0.25,) * 3).shape == (3, 2 * S, 2 * S)  # masks only


# --------------------------------------------------------------------------- training through the shared loop

# 128 CIFAR images, a 2-block encoder, 1 regressor and 1 decoder block: 8 steps per epoch of batch 16.
TINY = [
    "method=cae", "model.preset=cae_vit_tiny_cifar_patch4", "model.depth=2", "model.regressor_depth=1",
    "model.decoder_depth=1", "model.mask_min_block=5", "data.limit=128", "data.num_workers=0", "train.batch_size=16",
    "train.blr=4e-3", "train.warmup_epochs=0.5", "train.epochs=2", "train.log_every=2", "train.vis_images=2",
    "train.clip_grad=3.0", "train.betas=[0.9, 0.999]",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny(out: Path, cache: str, *extra: str):
    return load_config(None, [*TINY, f"data.cache_dir={cache}", f"out_dir={out}", *extra])


def test_recipe_loads_with_the_scaled_mask():
    cfg = load_config(Path(__file__).parents[1] / "configs/pretrain/cae_vit_tiny_cifar10.yaml")
    assert cfg.method == "cae" and cfg.model["mask_min_block"] == 5 and cfg.train.clip_grad == 3.0


def test_cae_pretraining_loss_goes_down(tmp_path, cache):
    summary = pretrain(tiny(tmp_path, cache))
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]
    assert summary["step"] == 16 and (tmp_path / "pictures" / "recon-00000016.png").is_file()
    state = checkpoint.load(summary["checkpoint"])
    assert state["method"] == "cae" and not any("align" in k for k in state["model"])
    assert load_config(tmp_path / "config.yaml").method == "cae"


def _crash_at(step: int, out: Path, cache: str) -> subprocess.CompletedProcess:
    """Run the tiny CAE recipe in a fresh process that dies (os._exit) after `step` steps."""
    script = textwrap.dedent(f"""
        import os
        from mimkit.config import load_config
        from mimkit.train.loop import pretrain
        cfg = load_config(None, {TINY + [f"data.cache_dir={cache}", f"out_dir={out}", "train.ckpt_every=2"]!r})
        pretrain(cfg, hooks=[lambda info: os._exit(17) if info.step == {step} else None])
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


def test_cae_resume_after_a_crash_is_bit_exact(tmp_path, cache):
    full = tmp_path / "full"
    pretrain(tiny(full, cache, "train.ckpt_every=2", "train.keep_last=10"))
    crashed = tmp_path / "crashed"
    crash = _crash_at(5, crashed, cache)
    assert crash.returncode == 17, crash.stderr[-2000:]
    assert checkpoint.list_checkpoints(crashed / "checkpoints")[-1].name == "checkpoint-00000004.pt"
    assert pretrain(tiny(crashed, cache, "train.ckpt_every=2"), resume="auto")["step"] == 16
    a = checkpoint.load(full / "checkpoints" / "checkpoint-00000016.pt")
    b = checkpoint.load(crashed / "checkpoints" / "checkpoint-00000016.pt")
    assert a["model"].keys() == b["model"].keys()
    differ = {k: (a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]
              if not torch.equal(a["model"][k], b["model"][k])}
    if differ:  # say whether the crashed process's first steps or the resumed ones diverged
        at4 = [checkpoint.load(d / "checkpoints" / "checkpoint-00000004.pt")["model"] for d in (full, crashed)]
        same4 = all(torch.equal(at4[0][k], at4[1][k]) for k in at4[0])
        pytest.fail(f"step 16 weights differ (step 4 {'equal' if same4 else 'differs'}): {differ}")
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    timing = ("images_per_s", "time_s")
    drop = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert drop(read_metrics(full / "metrics.jsonl")) == drop(read_metrics(crashed / "metrics.jsonl"))


def test_cae_skips_and_reports_unreadable_files(tmp_path, caplog):
    from test_train import _folder_with_bad_files

    bad = _folder_with_bad_files(tmp_path / "imgs")
    args = ["method=cae", "data.dataset=folder", f"data.root={tmp_path / 'imgs'}", "data.load_size=36",
            "data.num_workers=0", "model.preset=cae_vit_tiny_cifar_patch4", "model.depth=1", "model.regressor_depth=1",
            "model.decoder_depth=1", "train.batch_size=5", "train.epochs=2", "train.vis_images=0",
            f"out_dir={tmp_path / 'run'}"]
    summary = pretrain(load_config(None, args))
    assert summary["step"] == 6 and sorted(summary["skipped"]) == sorted(map(str, bad))
    assert "skipped 3 unreadable file(s)" in caplog.text
    with pytest.raises(Exception, match="^unreadable image "):
        pretrain(load_config(None, [*args, "data.strict=true", f"out_dir={tmp_path / 'strict'}"]))
