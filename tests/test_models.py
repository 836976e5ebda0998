import pytest
import torch

from mimkit.masking import num_kept, random_masking
from mimkit.models import build_model
from mimkit.models.mae import PRESETS
from mimkit.models.vit import attention, sincos_pos_embed_2d
from mimkit.targets import denormalize_patches, patchify, pixel_target, unpatchify


def _reference_sincos(dim, grid):
    """MAE's NumPy get_2d_sincos_pos_embed, transcribed literally (float64, meshgrid(w, h))."""
    import numpy as np

    grid_h = np.arange(grid, dtype=np.float32)
    grid_w = np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid, grid])

    def one(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_sincos_matches_mae_reference():
    ours = sincos_pos_embed_2d(64, 7)
    ref = torch.from_numpy(_reference_sincos(64, 7)).float()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert torch.all(ours[0] == 0)


def test_random_masking_contract():
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(4, 64, 0.75, generator=g)
    assert ids_keep.shape == (4, 16) and mask.dtype == torch.bool and mask.sum(1).tolist() == [48] * 4
    # kept indices are exactly the unmasked positions, and ids_restore inverts the shuffle
    for b in range(4):
        assert set(ids_keep[b].tolist()) == set((~mask[b]).nonzero().flatten().tolist())
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    shuffle = noise.argsort(1)
    assert torch.equal(shuffle.gather(1, ids_restore), torch.arange(64).expand(4, -1))
    assert num_kept(196, 0.75) == 49 and num_kept(10, 0.75) == 2  # int(L * (1 - ratio)), as MAE
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 4, 1.0)


def test_patchify_layout_is_pqc():
    imgs = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    x = patchify(imgs, 2)
    assert x.shape == (2, 4, 12)
    # first patch, first pixel: the three channels come last (p, q, c)
    assert x[0, 0, :3].tolist() == [imgs[0, 0, 0, 0], imgs[0, 1, 0, 0], imgs[0, 2, 0, 0]]
    assert torch.equal(unpatchify(x, 2), imgs)


def test_norm_pix_target_and_inverse():
    imgs = torch.randn(2, 3, 8, 8)
    t = pixel_target(imgs, 4, norm_pix=True)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 4), atol=1e-3)  # unbiased var, eps 1e-6
    torch.testing.assert_close(denormalize_patches(t, imgs, 4), patchify(imgs, 4), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["mae_vit_tiny_cifar_patch4", "mae_vit_tiny_cifar_patch2"])
def test_mae_shapes_and_encoder_sees_only_kept_tokens(preset):
    torch.manual_seed(0)
    model = build_model("mae", preset=preset)
    n = model.patch_embed.num_patches
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    out = model(torch.randn(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert seen == [torch.Size([2, 1 + num_kept(n, 0.75), 192])]  # no mask tokens in the encoder
    assert out.pred.shape == (2, n, model.patch_size**2 * 3) and out.mask.shape == (2, n)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_loss_is_mse_on_masked_patches_only():
    torch.manual_seed(0)
    model = build_model("mae", preset="mae_vit_tiny_cifar_patch4", decoder_depth=1)
    imgs = torch.randn(2, 3, 32, 32)
    out = model(imgs, generator=torch.Generator().manual_seed(0))
    err = ((out.pred - patchify(imgs, 4)) ** 2).mean(-1)
    torch.testing.assert_close(out.loss, err[out.mask].mean())


def test_initialisation_follows_mae():
    torch.manual_seed(0)
    model = build_model("mae", preset="mae_vit_tiny_cifar_patch4")
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(192, 8))
    torch.testing.assert_close(model.decoder_pos_embed[0], sincos_pos_embed_2d(128, 8))
    assert 0.015 < model.cls_token.std() < 0.025 and 0.015 < model.mask_token.std() < 0.03
    w = model.blocks[0].attn.qkv.weight
    bound = (6 / sum(w.shape)) ** 0.5  # xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound and model.blocks[0].attn.qkv.bias.abs().sum() == 0
    pw = model.patch_embed.proj.weight
    assert pw.abs().max() <= (6 / (pw.shape[0] + pw[0].numel())) ** 0.5  # xavier on the flattened view
    assert all(ln.eps == 1e-6 for ln in model.modules() if isinstance(ln, torch.nn.LayerNorm))


def test_features_never_mask():
    torch.manual_seed(0)
    model = build_model("mae", preset="mae_vit_tiny_cifar_patch4").train()
    x = torch.randn(2, 3, 32, 32)
    a, b = model.forward_features(x), model.forward_features(x)
    assert a.shape == (2, 65, 192) and torch.equal(a, b)


def test_presets_have_paper_sizes():
    assert PRESETS["mae_vit_large_patch16"]["embed_dim"] == 1024 and PRESETS["mae_vit_large_patch16"]["depth"] == 24
    assert PRESETS["mae_vit_huge_patch14"]["patch_size"] == 14
    sizes = ("tiny", "small", "base", "large", "huge")
    assert all(PRESETS[f"mae_vit_{s}_patch16"]["decoder_embed_dim"] == 512 for s in sizes)
    with torch.device("meta"):
        model = build_model("mae", preset="mae_vit_base_patch16")
    enc = sum(v.numel() for k, v in model.encoder_state_dict().items() if k != "pos_embed")
    assert 85_000_000 < enc < 87_000_000  # ViT-B/16: 86M


def test_bad_input_size_is_named():
    model = build_model("mae", preset="mae_vit_tiny_cifar_patch4")
    with pytest.raises(ValueError, match=r"expected images of 3 x 32 x 32, got \(1, 3, 64, 64\)"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("keys", [17, 65, 200])
def test_attention_matches_sdpa_in_bf16_and_grads_flow(keys):
    """The explicit bf16 CPU path (short sequences) and SDPA (long ones) compute the same function."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 3, n, 32, generator=g) for n in (keys - 1, keys, keys))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    lowp = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = attention(*lowp)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in lowp)
    torch.testing.assert_close(attention(q, k, v), ref)  # fp32 is SDPA itself
