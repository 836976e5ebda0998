"""Numerical parity with transformers' ViTMAEForPreTraining: same weights, images and noise."""

import pytest
import torch

from mimkit.convert import hf_to_mae
from mimkit.export import hf_config_from_mae, mae_to_hf
from mimkit.models import build_model

transformers = pytest.importorskip("transformers")  # a dev dependency; CI installs it

SIZES = {
    "cifar_tiny": dict(preset="mae_vit_tiny_cifar_patch4"),
    "small_64px": dict(preset="mae_vit_small_patch16", img_size=64, decoder_depth=2),
}


def _pair(size: str, norm_pix: bool):
    torch.manual_seed(0)
    ours = build_model("mae", SIZES[size], norm_pix_loss=norm_pix).eval()
    ref = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**hf_config_from_mae(ours.cfg)))
    ref.config._attn_implementation = "sdpa"
    ref.load_state_dict(mae_to_hf(ours.state_dict()), strict=True)
    return ours, ref.eval()


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("norm_pix", [False, True])
def test_forward_and_gradients_match_transformers(size, norm_pix):
    ours, ref = _pair(size, norm_pix)
    n = ours.patch_embed.num_patches
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, *ours.img_size, generator=g)
    noise = torch.rand(3, n, generator=g)

    out = ours(imgs, noise=noise)
    r = ref(pixel_values=imgs, noise=noise)
    assert torch.equal(out.ids_restore, r.ids_restore)
    assert torch.equal(out.mask.float(), r.mask)
    torch.testing.assert_close(out.pred, r.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, r.loss, atol=1e-5, rtol=0)

    out.loss.backward()
    r.loss.backward()
    ref_grads = hf_to_mae({k: p.grad for k, p in ref.named_parameters() if p.grad is not None})
    ours_grads = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    assert set(ours_grads) == set(ref_grads)
    for k, g_ours in ours_grads.items():
        err = (g_ours - ref_grads[k]).norm() / ref_grads[k].norm().clamp_min(1e-12)
        assert err < 1e-4, f"{k}: relative gradient error {err:.2e}"


def test_hf_round_trip_is_exact():
    ours, _ = _pair("cifar_tiny", False)
    back = hf_to_mae(mae_to_hf(ours.state_dict()))
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
