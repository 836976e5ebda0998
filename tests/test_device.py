"""The checks that must hold on every device, run on `MIMKIT_TEST_DEVICE` (default `cpu`; `cuda` on a GPU,
as `benchmarks/gpu.sh` does): parity with transformers in fp32, bit-exact resume with deterministic
algorithms, bf16 and fp16 training that stays finite, and one process under torchrun (DDP and FSDP2,
gloo on the CPU, NCCL on a GPU) training as a plain run does. On a GPU also what makes it fast: attention
on the flash kernel in bf16, and a training step that never waits on the host (those two are CUDA checks,
skipped on other devices). On a machine without the named device the module is skipped."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from resumed import equal_weights, interrupt_and_resume

from mimkit.config import load_config
from mimkit.metrics import read_metrics
from mimkit.models import build_model
from mimkit.train.loop import pretrain

DEVICE = torch.device(os.environ.get("MIMKIT_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip(f"MIMKIT_TEST_DEVICE={DEVICE}: no CUDA device here", allow_module_level=True)
ROOT = Path(__file__).parents[1]
# fp32 parity: CPU kernels agree to rounding; a GPU's (with TF32 off) differ in summation order.
TOL = {"rtol": 1e-5, "atol": 1e-6} if DEVICE.type == "cpu" else {"rtol": 1e-4, "atol": 1e-5}
cuda_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="a CUDA check (MIMKIT_TEST_DEVICE=cuda)")
TINY = ["model.preset=mae_vit_tiny_cifar_patch4", "model.depth=2", "model.decoder_depth=1", "data.limit=256",
        "data.num_workers=0", "train.batch_size=32", "train.blr=4e-3", "train.warmup_epochs=0.5", "train.epochs=2",
        "train.log_every=2", "train.vis_images=0", f"train.device={DEVICE}"]


@pytest.fixture(autouse=True)
def true_fp32():
    """Parity needs fp32 matmuls: no TF32 on a GPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_mae_matches_transformers_vitmae_on_the_device():
    transformers = pytest.importorskip("transformers")
    from mimkit.export import hf_config_from_mae, mae_to_hf

    torch.manual_seed(0)
    model = build_model("mae", preset="mae_vit_tiny_cifar_patch4").to(DEVICE)
    ref = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**hf_config_from_mae(model.cfg)))
    ref.load_state_dict(mae_to_hf(model.state_dict()))
    ref.to(DEVICE)
    g = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(4, 3, 32, 32, generator=g).to(DEVICE), torch.rand(4, 64, generator=g).to(DEVICE)
    ours, theirs = model(imgs, noise=noise), ref(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(ours.pred, theirs.logits, **TOL)
    torch.testing.assert_close(ours.loss, theirs.loss, **TOL)
    ours.loss.backward()
    theirs.loss.backward()
    torch.testing.assert_close(model.patch_embed.proj.weight.grad,
                               ref.vit.embeddings.patch_embeddings.projection.weight.grad, **TOL)


def test_pretraining_resumes_bit_exactly_with_deterministic_algorithms(tmp_path, cache):
    """On a GPU this needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment (gpu.sh sets it)."""
    torch.use_deterministic_algorithms(True)
    try:
        args = [*TINY, f"data.cache_dir={cache}", "train.ckpt_every=2"]
        pretrain(load_config(None, [*args, f"out_dir={tmp_path / 'full'}"]))
        summary = interrupt_and_resume(load_config(None, [*args, f"out_dir={tmp_path / 'cut'}"]), 5)
    finally:
        torch.use_deterministic_algorithms(False)
    assert summary["step"] == 16
    equal_weights(tmp_path / "full", tmp_path / "cut", 16)


@pytest.mark.parametrize("method", ["mae", "cae"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_stays_finite_and_learns(method, precision, tmp_path, cache):
    recipe = ROOT / "configs" / "pretrain" / f"{method}_vit_tiny_cifar10.yaml"
    cfg = load_config(recipe, [*TINY[1:], f"data.cache_dir={cache}", f"train.precision={precision}",
                               f"out_dir={tmp_path}", "train.epochs=1", "train.log_every=1"])
    summary = pretrain(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert summary["step"] == 8 and all(math.isfinite(x) for x in losses)
    assert min(losses[-3:]) < losses[0]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_under_torchrun_trains_as_a_plain_run(strategy, tmp_path, cache):
    args = [*TINY, f"data.cache_dir={cache}", "train.epochs=1"]
    recipe = "configs/pretrain/mae_vit_tiny_cifar10.yaml"
    pretrain(load_config(ROOT / recipe, [*args, f"out_dir={tmp_path / 'plain'}"]))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "mimkit",
           "pretrain", recipe, *args, f"train.strategy={strategy}",
           f"out_dir={tmp_path / strategy}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    def losses(run):
        return [r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]
    assert losses(strategy) == pytest.approx(losses("plain"), rel=TOL["rtol"], abs=TOL["atol"])
    assert len(losses("plain")) == 4


@cuda_only
@pytest.mark.parametrize("method", ["mae", "cae"])
def test_attention_runs_on_the_flash_kernel_in_bf16(method):
    """ViT-B under bf16 autocast (what `train.precision=auto` gives on a GPU) with SDPA restricted to the flash
    kernel: SDPA raises "No available kernel" if any attention of the model cannot use it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_model(method, preset=f"{method}_vit_base_patch16").to(DEVICE)
    imgs = torch.randn(4, 3, 224, 224, device=DEVICE)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(imgs, generator=torch.Generator().manual_seed(0)).loss
        loss.backward()
    assert torch.isfinite(loss) and model.patch_embed.proj.weight.grad.abs().sum() > 0


@cuda_only
@pytest.mark.parametrize("method", ["mae", "cae"])
@pytest.mark.parametrize("crop", [False, True], ids=["cropped-in-workers", "cropped-on-device"])
def test_a_training_step_never_waits_on_the_host(method, crop):
    """The loop's step on a batch cropped in the loader workers (folders, shards, datasets) or on the device
    (CIFAR-10 in memory): pinned upload, crops, flips, masks drawn on the CPU generator, bf16 forward, loss
    bookkeeping, backward, clipping, fused AdamW, with `torch.cuda.set_sync_debug_mode("error")`: any
    operation that makes the host wait for the GPU raises. Only log and checkpoint steps read values back."""
    from mimkit.data import PretrainAugment
    from mimkit.train.loop import LossWindow, _autocast, _optimizer_step, resolve_precision
    from mimkit.train.optim import build_adamw

    recipe = load_config(ROOT / "configs" / "pretrain" / f"{method}_vit_tiny_cifar10.yaml")
    torch.manual_seed(0)
    model = build_model(method, recipe.model).to(DEVICE)
    optimizer = build_adamw(model, 1e-4, 0.05, (0.9, 0.95), fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    augment = PretrainAugment(32, mean=recipe.data.mean, std=recipe.data.std, crop=crop)
    precision = resolve_precision("auto", DEVICE)
    window, g = LossWindow(DEVICE), torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8).pin_memory()

    def step(i: int) -> None:
        with _autocast(DEVICE, precision):
            out = model(augment(images.to(DEVICE, non_blocking=True), g), generator=g)
        window.add(i, out.loss, out.logs, 1.0, images.shape[0])
        scaler.scale(out.loss).backward()
        _optimizer_step(model, optimizer, scaler, 3.0, i + 1, 10)
        window.steps += 1

    step(0)  # the first step creates the optimizer's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert precision == "bf16" and math.isfinite(window.record()["loss"])
