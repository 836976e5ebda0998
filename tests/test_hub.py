"""The Hugging Face Hub, offline: `hf-hub:` sources read from a Hub cache, the model card of an export."""

import shutil

import pytest
import torch

import mimkit
from mimkit.cli import main
from mimkit.export import export
from mimkit.models import build_model
from mimkit.serialization import WeightsError

pytest.importorskip("huggingface_hub")  # the hub extra; dev installs it (transformers needs it too)
from huggingface_hub import constants  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache that huggingface_hub reads with the network switched off (HF_HUB_OFFLINE)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_repo(cache, repo: str, folder) -> None:
    """Lay `folder` out as huggingface_hub's cache does after a download of `repo` at COMMIT."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / COMMIT)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


def test_load_reads_a_repository_from_the_hub_cache(tmp_path, offline_cache):
    torch.manual_seed(0)
    model = build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=1, decoder_depth=1).eval()
    _cache_repo(offline_cache, "acme/mae-tiny", export(model, tmp_path / "hf", "hf"))
    imgs = torch.randn(2, 3, 32, 32)
    for source in ("hf-hub:acme/mae-tiny", f"hf-hub:acme/mae-tiny@{COMMIT}"):
        loaded = mimkit.load(source)
        with torch.no_grad():
            torch.testing.assert_close(loaded.forward_features(imgs), model.forward_features(imgs), atol=1e-6, rtol=0)
    assert main(["export", "hf-hub:acme/mae-tiny", "--to", "timm", "--out", str(tmp_path / "timm.pth")]) == 0


def test_a_repository_that_is_not_there_is_one_line(offline_cache):
    with pytest.raises(WeightsError, match=r"^hf-hub:acme/absent: cannot get it from the Hugging Face Hub \(") as e:
        mimkit.load("hf-hub:acme/absent")
    assert "\n" not in str(e.value)
    with pytest.raises(WeightsError, match=r"^hf-hub:acme: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION$"):
        mimkit.load("hf-hub:acme")


def test_the_export_carries_a_model_card_from_its_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "configs/pretrain/mae_vit_tiny_cifar10.yaml", "model.depth=1", "train.max_steps=2",
                 "train.log_every=1", "data.limit=64", "train.batch_size=32", "train.vis_images=0",
                 f"data.cache_dir={tmp_path / 'c'}", f"out_dir={run}"]) == 0
    ckpt = str(run / "checkpoints" / "checkpoint-00000002.pt")
    assert main(["eval", "knn", ckpt, "data.limit=100", f"data.cache_dir={tmp_path / 'c'}",
                 f"out_dir={run / 'eval' / 'knn'}"]) == 0
    assert main(["export", ckpt, "--to", "hf", "--out", str(tmp_path / "mae-tiny-cifar")]) == 0
    card = (tmp_path / "mae-tiny-cifar" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for line in ("A mae ViT 192x1 (3 heads), patch 4, 32 px, decoder 128x4, pretrained with",
                 "- method: `mae`, 32 px, patch 4, mask ratio 0.75",
                 "- data: `cifar10` at `builtin` (split `train`)",
                 "- recipe: 200 epochs planned, batch 32 x accumulation 1 per process, base lr 0.003",
                 "- trained: 2 steps, last loss", "| knn | ",
                 'model = ViTMAEForPreTraining.from_pretrained("your-name/mae-tiny-cifar")',
                 'model = mimkit.load("hf-hub:your-name/mae-tiny-cifar")', f"mimkit](https://pypi.org/project/mimkit/) "
                 f"{mimkit.__version__}"):
        assert line in card, line
    capsys.readouterr()
    assert main(["export", ckpt, "--to", "timm", "--out", str(tmp_path / "x.pth"), "--push-to-hub", "acme/x"]) == 2
    err = capsys.readouterr().err
    assert err == "mimkit: error: --push-to-hub uploads a Hugging Face folder: use it with --to hf, not --to timm\n"
