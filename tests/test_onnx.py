"""`mimkit export --to onnx`: the encoder's features as an ONNX graph, run in onnxruntime."""

import json

import numpy as np
import pytest
import torch

from mimkit.cli import main
from mimkit.export import export
from mimkit.models import build_model

onnx = pytest.importorskip("onnx")  # the onnx extra; dev installs it
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("method, preset, pool", [("mae", "mae_vit_tiny_cifar_patch4", "cls"),
                                                   ("cae", "cae_vit_tiny_cifar_patch4", "mean"),
                                                   ("simmim", "simmim_vit_tiny_cifar_patch4", "tokens")])
def test_onnxruntime_gives_the_pytorch_features_for_any_batch(tmp_path, method, preset, pool):
    torch.manual_seed(0)
    model = build_model(method, preset=preset, depth=2).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0 too, at the scale training gives them
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = export(model, tmp_path / "encoder.onnx", "onnx", pool=pool)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    for batch in (1, 5):
        imgs = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        got = session.run(["features"], {"pixel_values": imgs.numpy()})[0]
        with torch.no_grad():
            want = model.pooled_features(imgs, pool).numpy()
        assert got.shape == want.shape == ((batch, 64, 192) if pool == "tokens" else (batch, 192))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["pool"] == pool and json.loads(meta["mimkit"])["model"]["embed_dim"] == 192


def test_the_cli_writes_onnx_and_refuses_to_replace_it(tmp_path, capsys):
    torch.manual_seed(0)
    export(build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=1), tmp_path / "mae.pt", "official")
    args = ["export", str(tmp_path / "mae.pt"), "--to", "onnx", "--pool", "mean", "--out", str(tmp_path / "m.onnx")]
    assert main(args) == 0 and (tmp_path / "m.onnx").is_file()
    assert main(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"mimkit: error: {tmp_path / 'm.onnx'} exists: pass --overwrite (overwrite=True) to replace it"
