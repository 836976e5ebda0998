"""Evaluation protocols: their mechanics against hand-computed values, and every command end to end."""

import json
import math

import pytest
import torch

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.eval.attentive import AttentiveHead
from mimkit.eval.config import FinetuneConfig
from mimkit.eval.context import accuracy, vit_from
from mimkit.eval.finetune import mix, soft_targets
from mimkit.eval.knn import knn_scores
from mimkit.eval.linear import LARS, linear_head
from mimkit.metrics import read_metrics
from mimkit.models import build_model
from mimkit.train.loop import pretrain


def test_knn_votes_on_a_toy_set():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.1]])
    scores = knn_scores(bank, labels, query, num_classes=3, k=2, temperature=0.5)
    q = query[0] / query[0].norm()
    sims = [float(q @ (b / b.norm())) for b in bank]  # 0.9988, 0.0499, 0.7415, -0.9988
    expected = torch.tensor([[math.exp(sims[0] / 0.5), math.exp(sims[2] / 0.5), 0.0]])  # top-2: bank 0 and 2
    torch.testing.assert_close(scores, expected)
    # chunking does not change anything
    queries = torch.randn(7, 2)
    torch.testing.assert_close(knn_scores(bank, labels, queries, 3, 3, 0.07, chunk_size=2),
                               knn_scores(bank, labels, queries, 3, 3, 0.07, chunk_size=100))


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    assert accuracy(scores, torch.tensor([1, 1, 0]), ks=(1, 2)) == pytest.approx({"top1": 100 / 3, "top2": 200 / 3})


def test_lars_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5, -0.5])
    opt = LARS([w, b], lr=0.1, weight_decay=0.2, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    update = torch.tensor([[0.6, 0.8]]) + 0.2 * torch.tensor([[3.0, 4.0]])  # grad + wd * w, norm 2
    trust = 0.001 * 5.0 / update.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * trust * update)
    torch.testing.assert_close(b.detach(), torch.tensor([0.95, 1.05]))  # 1-D: plain SGD, no decay, no trust
    w.grad, b.grad = torch.zeros(1, 2), torch.zeros(2)
    before = w.detach().clone()
    opt.step()  # momentum carries the first update on (zero gradient: update = wd * w)
    assert not torch.equal(w.detach(), before)


def test_linear_probe_head_has_batchnorm_without_affine():
    head = linear_head(8, 3)
    assert [n for n, _ in head.named_parameters()] == ["1.weight", "1.bias"]  # BN has no weight/bias
    x = torch.randn(64, 8) * 5 + 3
    head.train()
    normed = head[0](x)
    torch.testing.assert_close(normed.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.var(0, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    assert head[1].weight.std() < 0.02


def test_attentive_head_pools_with_one_query():
    torch.manual_seed(0)
    head = AttentiveHead(16, 5, num_heads=4).eval()
    tokens = torch.randn(3, 10, 16)
    assert head(tokens).shape == (3, 5)
    # permuting the tokens does not change the pooled result: attention pooling is order-free
    torch.testing.assert_close(head(tokens), head(tokens[:, torch.randperm(10)]), atol=1e-5, rtol=0)


def test_soft_targets_and_mixup_label_mixing():
    labels = torch.tensor([0, 2, 1])
    t = soft_targets(labels, 4, 0.1)
    torch.testing.assert_close(t[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))
    images = torch.arange(3, dtype=torch.float).view(3, 1, 1, 1).expand(3, 3, 8, 8).clone()
    g = torch.Generator().manual_seed(0)
    mixed, targets = mix(images, labels, 4, FinetuneConfig(mixup=0.8, cutmix=0.0, smoothing=0.1), g)
    lam = float(1 - mixed[0, 0, 0, 0] / 2)  # image 0 (value 0) blended with image 2 (value 2)
    torch.testing.assert_close(mixed[1], torch.full((3, 8, 8), 1.0))  # the middle image mixes with itself
    torch.testing.assert_close(targets, lam * t + (1 - lam) * t.flip(0))
    assert targets.sum(1).allclose(torch.ones(3))


def test_cutmix_label_mixing_matches_the_pasted_area():
    labels = torch.tensor([0, 1])
    images = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    g = torch.Generator().manual_seed(3)
    mixed, targets = mix(images, labels, 2, FinetuneConfig(mixup=0.0, cutmix=1.0, smoothing=0.0), g)
    pasted = float(mixed[0, 0].mean())  # fraction of image 0 covered by image 1
    assert 0 < pasted < 1
    torch.testing.assert_close(targets[0], torch.tensor([1 - pasted, pasted]))
    torch.testing.assert_close(targets[1], torch.tensor([pasted, 1 - pasted]))


def test_vit_from_keeps_the_encoder_and_interpolates_positions():
    torch.manual_seed(0)
    mae = build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=2)
    same = vit_from(mae)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in mae.encoder_state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(same.forward_features(x), mae.forward_features(x))
    bigger = vit_from(mae, img_size=48, num_classes=10, global_pool="avg")
    assert bigger.pos_embed.shape == (1, 1 + 144, 192) and torch.equal(bigger.pos_embed[0, 0], mae.pos_embed[0, 0])
    assert bigger(torch.randn(2, 3, 48, 48)).shape == (2, 10) and "norm.weight" not in bigger.state_dict()


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A checkpoint made like the README demo's, only shorter."""
    out = tmp_path_factory.mktemp("demo")
    cfg = load_config("configs/pretrain/mae_vit_tiny_cifar10.yaml", [
        "model.depth=2", "model.decoder_depth=1", "train.batch_size=64", "train.epochs=1", "train.vis_images=0",
        "data.limit=512",
        f"out_dir={out}", f"data.cache_dir={out / 'cache'}"])
    return pretrain(cfg)["checkpoint"]


@pytest.mark.parametrize("protocol, extra", [
    ("knn", ["probe.pool=mean", "data.limit=1000"]),
    ("linprobe", ["probe.augment=false", "train.epochs=2", "data.limit=1000"]),
    ("linprobe", ["train.epochs=1", "data.limit=512"]),
    ("attnprobe", ["train.epochs=1", "data.limit=512"]),
    ("finetune", ["train.epochs=1", "data.limit=256", "train.batch_size=32"]),
])
def test_every_protocol_runs_on_a_demo_checkpoint(demo_checkpoint, protocol, extra, tmp_path, capsys):
    assert main(["eval", protocol, str(demo_checkpoint), *extra, f"out_dir={tmp_path}"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100 and result["protocol"] == protocol
    assert result["config"]["data"]["mean"] == [0.4914, 0.4822, 0.4465]  # the checkpoint's normalisation
    assert f"{protocol}: top1" in capsys.readouterr().out
    if protocol != "knn":
        assert (tmp_path / "best.pt").is_file() and (tmp_path / "curves.png").is_file()
        assert any("val_top1" in r for r in read_metrics(tmp_path / "metrics.jsonl"))
        assert len(list((tmp_path / "checkpoints").glob("checkpoint-*.pt"))) >= 1


@pytest.mark.parametrize("every, validated_epochs", [(2, [2, 4]), (0, [])])
def test_val_every_scores_every_n_epochs_or_only_at_the_end(demo_checkpoint, every, validated_epochs, tmp_path):
    args = ["probe.augment=false", "train.epochs=4", "train.batch_size=128", "data.limit=512"]
    assert main(["eval", "linprobe", str(demo_checkpoint), *args, f"val_every={every}", f"out_dir={tmp_path}"]) == 0
    scored = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val_top1" in r]
    assert scored == [4 * e for e in validated_epochs]  # 4 steps per epoch
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["steps"] == 16 and 0 <= result["top1"] <= 100
    if not every:  # scored once, at the end: that is the best there is
        assert result["best"]["top1"] == result["top1"] and not (tmp_path / "best.pt").exists()


def test_eval_reads_every_source_mimkit_load_reads(demo_checkpoint, tmp_path, capsys):
    """A Hugging Face export of the checkpoint scores what the checkpoint scores (same encoder)."""
    assert main(["export", str(demo_checkpoint), "--to", "hf", "--encoder-only", "--out", str(tmp_path / "hf")]) == 0
    norm = ["data.mean=[0.4914, 0.4822, 0.4465]", "data.std=[0.247, 0.2435, 0.2616]", "data.limit=500"]
    tops = []
    for source, out in ((demo_checkpoint, tmp_path / "a"), (tmp_path / "hf", tmp_path / "b")):
        assert main(["eval", "knn", str(source), *norm, f"out_dir={out}"]) == 0, capsys.readouterr().err
        tops.append(json.loads((out / "results.json").read_text())["top1"])
    assert tops[0] == tops[1] > 10.0


def test_eval_errors_are_one_line(demo_checkpoint, capsys):
    assert main(["eval", "knn", str(demo_checkpoint), "probe.k=x"]) == 2
    assert capsys.readouterr().err == "mimkit: error: probe.k: expected int, got str 'x'\n"
    assert main(["eval", "linprobe"]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err


def test_online_knn_monitor_logs_during_pretraining(tmp_path, capsys):
    assert main(["pretrain", "configs/pretrain/mae_vit_tiny_cifar10.yaml", "model.depth=1", "model.decoder_depth=1",
                 "train.batch_size=64", "data.limit=256", "train.epochs=2", "train.vis_images=0",
                 "monitor.every_epochs=1", "monitor.bank_size=200", "monitor.query_size=100",
                 f"out_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    knn = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "knn_top1" in r]
    assert [r["step"] for r in knn] == [4, 8] and all(0 <= r["knn_top1"] <= 100 for r in knn)
    assert (tmp_path / "curves.png").is_file()
