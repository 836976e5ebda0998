"""Other shapes and channels: rectangular inputs, 1 to N channels, 16-bit and float data, end to end."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from resumed import equal_weights, interrupt_and_resume

from mimkit.architecture import with_img_size
from mimkit.cli import main
from mimkit.config import ConfigError, load_config
from mimkit.data import BadImageError, DataError, EvalTransform, ImageFolder, RandomResizedCrop
from mimkit.data.arrays import read_pixels
from mimkit.data.stats import channel_stats
from mimkit.masking import block_mask, block_random_mask
from mimkit.models import build_model
from mimkit.models.vit import resample_pos_embed, sincos_pos_embed_2d
from mimkit.train import checkpoint
from mimkit.train.loop import pretrain
from mimkit.warmstart import adapt_in_chans, init_from

TINY = ["model.preset=mae_vit_tiny_cifar_patch4", "model.depth=1", "model.decoder_depth=1"]


def _official_sincos(dim: int, gh: int, gw: int) -> np.ndarray:
    """MAE's `get_2d_sincos_pos_embed` (util/pos_embed.py) with its grid built from (gh, gw) instead of a
    square: `np.meshgrid(grid_w, grid_h)`, the first half of the channels encoding grid[0] (the column)."""
    grid = np.stack(np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32)), 0)
    grid = grid.reshape(2, 1, gh, gw)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_rectangular_sincos_positions_follow_the_reference_and_transformers():
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    ours = sincos_pos_embed_2d(64, (3, 5))
    assert ours.shape == (16, 64)
    assert torch.allclose(ours, torch.from_numpy(_official_sincos(64, 3, 5)).float(), atol=1e-6)
    theirs = build_2d_sinusoidal_position_embedding(3, 5, 64, cls_token=True)  # (1 + 15, 64)
    theirs = torch.cat([theirs[..., 32:], theirs[..., :32]], -1)  # the halves ViTMAE rotates to MAE's layout
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(sincos_pos_embed_2d(64, 4), sincos_pos_embed_2d(64, (4, 4)))


def test_img_size_takes_a_side_or_height_and_width_and_names_bad_values():
    model = build_model("mae", preset="mae_vit_tiny_cifar_patch4", img_size=[32, 48], depth=1, decoder_depth=1)
    assert model.img_size == (32, 48) and model.patch_embed.grid_size == (8, 12) and model.pos_embed.shape[1] == 97
    out = model(torch.randn(2, 3, 32, 48), generator=torch.Generator().manual_seed(0))
    assert out.pred.shape == (2, 96, 48) and out.mask.sum(1).tolist() == [72, 72] and torch.isfinite(out.loss)
    with pytest.raises(ConfigError, match=r"model.patch_size: 4 does not divide model.img_size=\[32, 50\]"):
        build_model("mae", preset="mae_vit_tiny_cifar_patch4", img_size=[32, 50])
    for bad, message in (("[32, 0]", "every side must be >= 1"), ("[1, 2, 3]", "expected int or a list"),
                         ("x", "expected int or a list")):
        with pytest.raises(ConfigError, match=message):
            build_model("mae", preset="mae_vit_tiny_cifar_patch4", img_size=yaml.safe_load(bad))


def test_masks_on_rectangular_grids_keep_their_counts_and_bounds():
    mask, blocks = block_mask(64, (6, 10), 30, generator=torch.Generator().manual_seed(0), return_blocks=True)
    assert mask.shape == (64, 60) and mask.sum(1).eq(30).all()
    assert (blocks[:, 1] + blocks[:, 3] <= 6).all() and (blocks[:, 2] + blocks[:, 4] <= 10).all()
    cols = mask.view(64, 6, 10).float().mean((0, 1))  # every column is reached, not only a 6 x 6 square
    assert cols.min() > 0.2
    simmim = block_random_mask(500, (4, 6), 2, 0.6, generator=torch.Generator().manual_seed(0))
    blockwise = simmim.view(500, 2, 2, 3, 2)
    assert (blockwise == blockwise[:, :, :1, :, :1]).all()  # 2 x 2 blocks of patches move together
    assert simmim.view(500, 4, 6)[:, ::2, ::2].sum((1, 2)).eq(4).all()  # ceil(6 * 0.6) = 4 blocks
    for method, preset in (("cae", "cae_vit_tiny_cifar_patch4"), ("simmim", "simmim_vit_tiny_cifar_patch4")):
        model = build_model(method, preset=preset, img_size=[32, 48], depth=1)
        out = model(torch.randn(2, 3, 32, 48), generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(out.loss) and out.mask.shape == (2, 96), method


def test_position_embeddings_resample_between_rectangular_grids():
    pos = torch.randn(1, 1 + 3 * 5, 8)
    out = resample_pos_embed(pos, (6, 4), source=(3, 5))
    grid = pos[:, 1:].reshape(1, 3, 5, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 24, 8)
    assert torch.equal(out[:, :1], pos[:, :1]) and torch.allclose(out[:, 1:], ref)
    with pytest.raises(ValueError, match="not a 4 x 4 grid"):
        resample_pos_embed(pos, (2, 2), source=(4, 4))
    model = build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=1, decoder_depth=1)
    wide = with_img_size(model, (32, 64))
    assert wide.img_size == (32, 64) and wide.pos_embed.shape[1] == 1 + 8 * 16
    assert with_img_size(model, 32) is model


def test_evaluation_resize_covers_a_rectangle_and_keeps_the_square_rule():
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    out = EvalTransform((32, 48), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)(images)
    assert out.shape == (2, 3, 32, 48)  # 64 x 64 -> 48 x 48 -> center 32 x 48
    square = EvalTransform(32, crop_pct=0.875)(images)
    ref = F.interpolate(images.float(), size=(36, 36), mode="bicubic", antialias=True, align_corners=False)
    ref = ((ref.clamp(0, 255)[..., 2:34, 2:34] / 255 - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1))
           / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1))
    assert torch.allclose(square, ref, atol=1e-5)


# --------------------------------------------------------------------------- channels and bit depth


def test_16_bit_grey_and_float_arrays_keep_their_values(tmp_path):
    deep = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 34 % 65536).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    x = read_pixels(tmp_path / "deep.png", 1)
    assert x.dtype == torch.float32 and x.shape == (1, 40, 48)
    assert torch.equal(x[0], torch.from_numpy(deep.astype(np.float32) * np.float32(255 / 65535)))
    assert len(torch.unique(x)) > 256  # not squashed to 8 bits
    Image.fromarray((deep >> 8).astype(np.uint8)).save(tmp_path / "grey.png")
    assert read_pixels(tmp_path / "grey.png", 1).dtype == torch.uint8
    bands = np.random.default_rng(0).random((6, 20, 30)).astype(np.float32)
    np.save(tmp_path / "chw.npy", bands)
    np.save(tmp_path / "hwc.npy", bands.transpose(1, 2, 0))
    for name in ("chw.npy", "hwc.npy"):
        assert torch.equal(read_pixels(tmp_path / name, 6), torch.from_numpy(bands * np.float32(255)))
    import tifffile

    tifffile.imwrite(tmp_path / "bands.tif", (bands * 1000).astype(np.uint16))
    assert torch.allclose(read_pixels(tmp_path / "bands.tif", 6),
                          torch.from_numpy((bands * 1000).astype(np.uint16).astype(np.float32) * (255 / 65535)))


def test_hostile_or_wrong_arrays_are_one_line_errors(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "three.npy", np.zeros((3, 8, 8), np.float32))
    np.save(tmp_path / "nan.npy", np.full((6, 8, 8), np.nan, np.float32))
    np.lib.format.open_memmap(tmp_path / "huge.npy", "w+", np.uint8, (6, 16500, 16500))  # sparse, 1.6 GB
    np.save(tmp_path / "small.npy", np.zeros((6, 8, 8), np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "small.npy").read_bytes()[:140])  # the header claims more
    for name, reason in (("objects.npy", "Python objects"), ("three.npy", "no axis of 6 channels"),
                         ("nan.npy", "non-finite"), ("huge.npy", "MAX_IMAGE_PIXELS"), ("cut.npy", "mmap length")):
        with pytest.raises(BadImageError, match=reason) as e:
            read_pixels(tmp_path / name, 6)
        assert "\n" not in str(e.value) and name in str(e.value)
    Image.new("RGB", (8, 8)).save(tmp_path / "rgb.png")
    with pytest.raises(BadImageError, match="RGB image has 3 band"):
        read_pixels(tmp_path / "rgb.png", 6)


def test_crops_and_evaluation_decode_n_channels_without_rounding(tmp_path):
    bands = np.random.default_rng(1).random((50, 70, 6)).astype(np.float32)
    np.save(tmp_path / "a.npy", bands)
    crop = RandomResizedCrop((16, 24), channels=6)
    out = crop(str(tmp_path / "a.npy"), key=7, index=3)
    top, left, h, w = crop.box(50, 70, 7, 3)
    x = torch.from_numpy(bands * np.float32(255)).permute(2, 0, 1)[None, :, top : top + h, left : left + w]
    ref = F.interpolate(x, size=(16, 24), mode="bicubic", antialias=True, align_corners=False)[0]
    assert out.dtype == torch.float32 and out.shape == (6, 16, 24) and torch.equal(out, ref)
    folder = ImageFolder(str(tmp_path), load_size=(20, 30), channels=6)
    assert folder[0].image.shape == (6, 20, 30) and folder[0].image.dtype == torch.float32


def test_data_stats_are_the_per_channel_mean_and_std(tmp_path, capsys):
    rng = np.random.default_rng(2)
    arrays = [rng.random((4, 9 + i, 11)).astype(np.float32) * (i + 1) for i in range(3)]
    for i, a in enumerate(arrays):
        np.save(tmp_path / f"{i}.npy", a)
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    stats = channel_stats(str(tmp_path), channels=4)
    every = np.concatenate([a.reshape(4, -1) for a in arrays], axis=1).astype(np.float64)
    assert stats["images"] == 3 and len(stats["skipped"]) == 1
    assert np.allclose(stats["mean"], every.mean(1), atol=1e-5) and np.allclose(stats["std"], every.std(1), atol=1e-5)
    assert main(["data", "stats", str(tmp_path), "--channels", "4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("data.mean=[") and json.loads(line.split("data.std=")[1]) == stats["std"]


def test_rgb_weights_start_an_n_channel_model_with_an_adapted_patch_embedding(tmp_path):
    rgb = build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=1, decoder_depth=1)
    checkpoint.write_atomic(tmp_path / "rgb.pth", {"model": rgb.state_dict()})
    kernel = rgb.patch_embed.proj.weight.detach()
    assert torch.equal(adapt_in_chans(kernel, 1), kernel.sum(1, keepdim=True))
    six = adapt_in_chans(kernel, 6)
    assert torch.equal(six[:, 3:], six[:, :3]) and torch.allclose(six[:, :3], kernel / 2)
    for channels in (1, 6):
        model = build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=1, decoder_depth=1, in_chans=channels)
        fresh = model.decoder_pred.weight.detach().clone()
        info = init_from(model, tmp_path / "rgb.pth")
        assert torch.equal(model.patch_embed.proj.weight, adapt_in_chans(kernel, channels))
        assert torch.equal(model.blocks[0].attn.qkv.weight, rgb.blocks[0].attn.qkv.weight)
        assert torch.equal(model.decoder_pred.weight, fresh) and "decoder_pred" in info["initialised"]
    six_model = build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=1, decoder_depth=1, in_chans=6)
    checkpoint.write_atomic(tmp_path / "six.pth", {"model": six_model.state_dict()})
    with pytest.raises(ConfigError, match="model.in_chans is 6 in the file and 3 in the recipe"):
        init_from(rgb, tmp_path / "six.pth")


# --------------------------------------------------------------------------- end to end


def _grey16(root, n=12):
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        ramp = np.linspace(0, 1, 44)[None, :] if i % 2 else np.linspace(0, 1, 40)[:, None]
        img = (ramp * 50000 + rng.integers(0, 3000, (40, 44))).astype(np.uint16)
        Image.fromarray(img).save(root / f"c{i % 2}" / f"{i:02d}.png")


def _bands6(root, n=12):
    rng = np.random.default_rng(1)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        np.save(root / f"c{i % 2}" / f"{i:02d}.npy", rng.random((40, 36, 6)).astype(np.float32) * (1 + i % 2))


def _rgb_wide(root, n=12):
    rng = np.random.default_rng(2)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, (250, 350, 3), dtype=np.uint8) // (1 + i % 2)
        Image.fromarray(img).save(root / f"c{i % 2}" / f"{i:02d}.jpg")


CASES = {
    "grey16": (_grey16, ["model.in_chans=1", "data.mean=[0.4]", "data.std=[0.25]", "model.norm_pix_loss=true"]),
    "bands6": (_bands6, ["model.in_chans=6", "data.mean=[0.75,0.75,0.75,0.75,0.75,0.75]",
                         "data.std=[0.4,0.4,0.4,0.4,0.4,0.4]", "data.rgb_bands=[5,3,1]", "model.norm_pix_loss=true"]),
    "wide_rgb": (_rgb_wide, ["model.img_size=[224,320]", "model.patch_size=16"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_other_shapes_and_channels_pretrain_resume_exactly_evaluate_and_draw(case, tmp_path, capsys):
    make, extra = CASES[case]
    make(tmp_path / "data")
    args = ["data.dataset=folder", f"data.root={tmp_path / 'data'}", "data.num_workers=0", *TINY, *extra,
            "train.batch_size=4", "train.epochs=2", "train.ckpt_every=3", "train.vis_images=2"]
    pretrain(load_config(None, [*args, f"out_dir={tmp_path / 'full'}"]))

    interrupt_and_resume(load_config(None, [*args, f"out_dir={tmp_path / 'cut'}"]), 4)  # from step 3, mid-epoch
    equal_weights(tmp_path / "full", tmp_path / "cut", 6)

    with Image.open(tmp_path / "full" / "pictures" / "recon-00000006.png") as im:
        picture = np.asarray(im)
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.std() > 1
    if case == "grey16":
        assert (picture[..., 0] == picture[..., 1]).all() and (picture[..., 1] == picture[..., 2]).all()
    if case == "wide_rgb":
        assert picture.shape[:2] == (2 * 224, 4 * 320)

    source = tmp_path / "full" / "checkpoints" / "checkpoint-00000006.pt"
    assert main(["eval", "knn", str(source), "data.num_workers=0", "data.split=train", "val_split=train",
                 f"out_dir={tmp_path / 'knn'}"]) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert 0 <= result["top1"] <= 100 and result["config"]["data"]["mean"] == list(load_config(None, args).data.mean)
    rgb = case == "wide_rgb"
    for protocol, more in (("linprobe", ["probe.augment=true"]),
                           ("finetune", [] if rgb else ["finetune.randaug_n=0"])):
        out = tmp_path / protocol
        assert main(["eval", protocol, str(source), "data.num_workers=0", "train.epochs=1", "train.batch_size=4",
                     *more, f"out_dir={out}"]) == 0, capsys.readouterr().err
        assert 0 <= json.loads((out / "results.json").read_text())["top1"] <= 100
    assert main(["visualize", str(source), "--out", str(tmp_path / "vis.png"), "--num", "2"]) == 0
    with Image.open(tmp_path / "vis.png") as vis:
        assert vis.size == picture.shape[1::-1]


def test_channel_mismatches_between_model_and_data_are_one_line(tmp_path):
    _grey16(tmp_path / "data", n=2)
    base = ["data.dataset=folder", f"data.root={tmp_path / 'data'}", *TINY, f"out_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match="data.mean and data.std have 3 values, one per channel, but model.in_chans "
                                          "is 1"):
        pretrain(load_config(None, [*base, "model.in_chans=1"]))
    with pytest.raises(ConfigError, match="data.dataset: cifar10 holds RGB images; model.in_chans=1"):
        pretrain(load_config(None, [*TINY, "model.in_chans=1", "data.mean=[0.5]", "data.std=[0.5]",
                                    f"out_dir={tmp_path / 'c'}"]))
    with pytest.raises(DataError, match="no readable image"):
        channel_stats(str(tmp_path / "data"), channels=6)
    from mimkit.eval.config import FinetuneConfig
    from mimkit.eval.finetune import FinetuneAugment

    with pytest.raises(ConfigError, match="RandAugment's colour operations need RGB images, and these have 1 "
                                          "channels; set finetune.randaug_n=0"):
        FinetuneAugment(32, FinetuneConfig(randaug_n=2), (0.2, 1), (0.75, 1.33), (0.5,), (0.5,))


# --------------------------------------------------------------------------- rectangles in and out


def _random(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(mean + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_a_rectangular_encoder_matches_transformers_vit_and_its_mae_export_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mimkit.export import export
    from mimkit.serialization import WeightsError

    hf_mae = dict(image_size=[32, 48], patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                  decoder_num_attention_heads=2, decoder_intermediate_size=64)
    with pytest.raises(RuntimeError):  # transformers' ViTMAE: sin-cos positions of int(sqrt(N))^2 patches
        transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**hf_mae))
    mae = _random(build_model("mae", preset="mae_vit_tiny_cifar_patch4", img_size=[32, 48], depth=2, decoder_depth=1))
    with pytest.raises(WeightsError, match="square patch grids only .* 32 x 48") as e:
        export(mae, tmp_path / "mae", "hf")
    assert "\n" not in str(e.value)
    export(mae, tmp_path / "hf", "hf", encoder_only=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_size"] == [32, 48]
    ref = transformers.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    imgs = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ref(pixel_values=imgs).last_hidden_state, mae.forward_features(imgs),
                                   atol=1e-5, rtol=0)
    from mimkit.convert import load

    back = load(tmp_path / "hf")  # the rectangle comes back from config.json, not from sqrt(num_patches)
    assert back.img_size == (32, 48) and torch.equal(back.pos_embed, mae.pos_embed)
    export(mae, tmp_path / "timm", "timm", encoder_only=True)
    timm_cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert timm_cfg["pretrained_cfg"]["input_size"] == [3, 32, 48] and timm_cfg["model_args"]["img_size"] == [32, 48]


def test_the_cli_resamples_to_height_by_width_and_init_resamples_a_rectangle(tmp_path, capsys):
    wide = _random(build_model("mae", preset="mae_vit_tiny_cifar_patch4", img_size=[32, 48], depth=1,
                               decoder_depth=1))
    from mimkit.export import export

    export(wide, tmp_path / "wide.safetensors", "safetensors")
    assert main(["export", str(tmp_path / "wide.safetensors"), "--to", "safetensors", "--img-size", "48x32",
                 "--out", str(tmp_path / "tall.safetensors")]) == 0
    assert "48x32 px" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):
        main(["export", str(tmp_path / "wide.safetensors"), "--to", "timm", "--img-size", "48x", "--out",
              str(tmp_path / "x.pth")])
    assert "'48x' is neither a side nor HEIGHTxWIDTH" in capsys.readouterr().err
    square = build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=1, decoder_depth=1)
    init_from(square, tmp_path / "wide.safetensors")
    ref = resample_pos_embed(wide.pos_embed.detach(), (8, 8), source=(8, 12))
    assert torch.equal(square.pos_embed, ref) and torch.equal(square.blocks[0].mlp.fc1.weight,
                                                              wide.blocks[0].mlp.fc1.weight)


def test_onnx_keeps_a_rectangle_of_six_channels(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from mimkit.export import export

    model = _random(build_model("mae", preset="mae_vit_tiny_cifar_patch4", img_size=[32, 48], in_chans=6, depth=1,
                                decoder_depth=1))
    path = export(model, tmp_path / "encoder.onnx", "onnx", pool="mean")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    imgs = torch.randn(3, 6, 32, 48, generator=torch.Generator().manual_seed(0))
    got = session.run(["features"], {"pixel_values": imgs.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model.pooled_features(imgs, "mean").numpy(), atol=1e-4, rtol=0)
