"""The pretraining loop: loss going down, exact resume after a crash, bad files, non-finite loss."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from mimkit.config import load_config
from mimkit.data import BadImageError, ResumableSampler, build_dataset
from mimkit.metrics import read_metrics
from mimkit.models.mae import MAE
from mimkit.train import checkpoint
from mimkit.train.loop import NonFiniteLossError, pretrain
from mimkit.train.optim import cosine_lr

# 256 CIFAR images, a 2-block encoder and 1-block decoder: 8 steps per epoch of batch 32.
TINY = [
    "model.preset=mae_vit_tiny_cifar_patch4", "model.depth=2", "model.decoder_depth=1", "model.norm_pix_loss=true",
    "data.limit=256", "data.num_workers=0", "train.batch_size=32", "train.blr=4e-3", "train.warmup_epochs=0.5",
    "train.epochs=2", "train.log_every=2", "train.vis_images=2",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny(out: Path, cache: str, *extra: str):
    return load_config(None, [*TINY, f"data.cache_dir={cache}", f"out_dir={out}", *extra])


# Losses logged every 2 steps by this run (fp32, CPU; identical in repeated runs here). A change
# to the model, masking, augmentation, data order or schedule moves them; the tolerance only
# absorbs BLAS differences between CPUs.
GOLDEN = [2.549647, 1.954304, 1.349524, 1.163371, 1.091294, 1.063879, 1.079892, 1.017401]


def test_loss_goes_down_along_the_golden_trajectory(tmp_path, cache):
    summary = pretrain(tiny(tmp_path, cache))
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert losses == pytest.approx(GOLDEN, rel=1e-3)
    assert losses[-1] < 0.6 * losses[0]
    assert summary["step"] == 16 and summary["checkpoint"] == tmp_path / "checkpoints" / "checkpoint-00000016.pt"
    assert (tmp_path / "pictures" / "recon-00000016.png").is_file()
    assert load_config(tmp_path / "config.yaml").train.epochs == 2  # the resolved config loads back


def test_schedule_steps_sets_a_run_and_schedule_of_any_length(tmp_path, cache):
    """train.schedule_steps=12 with 8 steps per epoch: 1.5 epochs, the cosine schedule ending at step 12."""
    summary = pretrain(tiny(tmp_path, cache, "train.schedule_steps=12", "train.vis_images=0"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert summary["step"] == 12 and records[-1]["step"] == 12 and records[-1]["epoch"] == 1.5
    base = 4e-3 * 32 / 256  # blr x batch / 256; warmup 0.5 epochs = 4 steps
    for r in records:  # the lr logged at a step is the one that step trained with (the schedule at step - 1)
        assert r["lr"] == pytest.approx(cosine_lr(r["step"] - 1, 12, 4, base), rel=1e-6)
    assert records[-1]["lr"] < 0.05 * base  # one step before the end of the cosine (epochs=2 would be at 0.35)


def _crash_at(step: int, out: Path, cache: str) -> int:
    """Run the tiny recipe in a fresh process that dies (os._exit: no clean-up) after `step` steps."""
    script = textwrap.dedent(f"""
        import os
        from mimkit.config import load_config
        from mimkit.train.loop import pretrain
        cfg = load_config(None, {TINY + [f"data.cache_dir={cache}", f"out_dir={out}", "train.ckpt_every=2"]!r})
        pretrain(cfg, hooks=[lambda info: os._exit(17) if info.step == {step} else None])
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True).returncode


def test_resume_after_a_crash_is_bit_exact(tmp_path, cache):
    full = tmp_path / "full"
    pretrain(tiny(full, cache, "train.ckpt_every=2"))

    crashed = tmp_path / "crashed"
    assert _crash_at(5, crashed, cache) == 17
    assert [p.name for p in checkpoint.list_checkpoints(crashed / "checkpoints")][-1] == "checkpoint-00000004.pt"
    summary = pretrain(tiny(crashed, cache, "train.ckpt_every=2"), resume="auto")  # mid-epoch: 4 of 8
    assert summary["step"] == 16

    a = checkpoint.load(full / "checkpoints" / "checkpoint-00000016.pt")
    b = checkpoint.load(crashed / "checkpoints" / "checkpoint-00000016.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    drop = lambda rs: [{k: v for k, v in r.items() if k not in ("images_per_s", "time_s")} for r in rs]  # noqa: E731
    assert drop(read_metrics(full / "metrics.jsonl")) == drop(read_metrics(crashed / "metrics.jsonl"))


def _folder_with_bad_files(root: Path) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        cls = root / ("cats" if i % 2 else "dogs")
        cls.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(cls / f"{i:02d}.{'png' if i % 3 else 'jpg'}")
    bad = [root / "cats" / "truncated.jpg", root / "dogs" / "empty.jpg", root / "dogs" / "notes.jpg"]
    whole = (root / "dogs" / "00.jpg").read_bytes()
    bad[0].write_bytes(whole[: len(whole) // 2])
    bad[1].write_bytes(b"")
    bad[2].write_text("this is not a picture\n")
    return bad


def test_unreadable_files_are_skipped_and_reported(tmp_path, caplog):
    bad = _folder_with_bad_files(tmp_path / "imgs")
    args = ["data.dataset=folder", f"data.root={tmp_path / 'imgs'}", "data.load_size=36", "data.num_workers=2",
            "model.preset=mae_vit_tiny_cifar_patch4", "model.depth=1", "model.decoder_depth=1",
            "train.batch_size=5", "train.epochs=2", "train.vis_images=0", f"out_dir={tmp_path / 'run'}"]
    summary = pretrain(load_config(None, args))
    assert summary["step"] == 6  # 15 files, batch 5: 3 steps per epoch although some batches shrink
    assert sorted(summary["skipped"]) == sorted(map(str, bad))
    assert "skipped 3 unreadable file(s)" in caplog.text and all(str(p) in caplog.text for p in bad)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["skipped"] == 3

    ds = build_dataset("folder", str(tmp_path / "imgs"), "train", 32, load_size=36)
    order = ResumableSampler(len(ds), seed=0).order().tolist()
    first = next(ds.path(i) for i in order if Path(ds.path(i)) in bad)
    with pytest.raises(BadImageError, match=f"^unreadable image {first}: "):
        pretrain(load_config(None, [*args, "data.strict=true", f"out_dir={tmp_path / 'strict'}"]))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache, monkeypatch):
    calls = []
    original = MAE.forward_loss

    def poisoned(self, imgs, pred, mask):
        calls.append(1)
        loss = original(self, imgs, pred, mask)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(MAE, "forward_loss", poisoned)
    expected = r"^non-finite loss at step 3; the last good checkpoint is .*checkpoint-00000002\.pt$"
    with pytest.raises(NonFiniteLossError, match=expected):
        pretrain(tiny(tmp_path, cache, "train.ckpt_every=1", "train.log_every=100", "train.vis_images=0"))
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["checkpoint-00000001.pt", "checkpoint-00000002.pt"]
    state = checkpoint.load(tmp_path / "checkpoints" / names[-1])
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, cache, precision):
    summary = pretrain(tiny(tmp_path, cache, f"train.precision={precision}", "train.max_steps=4", "train.vis_images=0"))
    assert summary["step"] == 4 and torch.isfinite(torch.tensor(summary["loss"]))
    state = checkpoint.load(summary["checkpoint"])
    assert bool(state["scaler"]) == (precision == "fp16")  # a grad scaler only for fp16
    assert state["model"]["blocks.0.attn.qkv.weight"].dtype == torch.float32


def test_accumulation_scales_the_effective_batch(tmp_path, cache):
    pretrain(tiny(tmp_path, cache, "train.accum_steps=2", "train.max_steps=4", "train.vis_images=0"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["epoch"] == pytest.approx(4 / 4)  # 8 micro-batches per epoch -> 4 optimizer steps
    saved = json.loads(json.dumps(checkpoint.load(tmp_path / "checkpoints" / "checkpoint-00000004.pt")["config"]))
    assert saved["train"]["accum_steps"] == 2 and os.path.isfile(tmp_path / "config.yaml")
