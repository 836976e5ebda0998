"""What every benchmark script shares: a description of the machine, writing the JSON report, and phases
that are skipped when an earlier (interrupted) run already wrote their JSON."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

CPU = torch.device("cpu")


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9B14", "Intel(R) Xeon(R) ..."), or the architecture if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | None = None) -> dict:
    """The facts a reader needs to compare figures across runs (with a CUDA `device`: its GPU too)."""
    facts = {"machine": f"{cpu_model()}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    if device is not None and device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def run_phase(name: str, out: Path, fn, *fn_args) -> dict:
    """Run `fn` unless out/name.json exists; store and return its result (with the phase's minutes)."""
    path = out / f"{name}.json"
    if path.exists():
        print(f"{name}: done before ({path})")
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = fn(*fn_args)
    result["phase_minutes"] = (time.perf_counter() - start) / 60
    path.write_text(json.dumps(result, indent=2))
    return result


def steps_for(minutes: float, images_per_s: float, batch: int) -> int:
    """Optimizer steps of `batch` images that `minutes` of training at `images_per_s` buy (at least one)."""
    return max(1, round(minutes * 60 * images_per_s / batch))


def pretrain_images_per_s(cfg, steps: int = 8) -> float:
    """Training speed of a pretraining config's model and augmentation on random 32 px images (after two
    warm-up steps), with the memory settings every training run uses (`train.keep_memory`)."""
    from mimkit.data import PretrainAugment
    from mimkit.models import METHODS, resolve_model_config
    from mimkit.train.malloc import keep_freed_memory
    from mimkit.train.optim import build_adamw

    keep_freed_memory()
    model_cfg = resolve_model_config(cfg.method, cfg.model)
    torch.manual_seed(0)
    model = METHODS[cfg.method][1](model_cfg)
    opt = build_adamw(model, 1e-4, cfg.train.weight_decay, cfg.train.betas)
    augment = PretrainAugment(model_cfg.img_size, mean=cfg.data.mean, std=cfg.data.std)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (cfg.train.batch_size, 3, 32, 32), dtype=torch.uint8)

    def step():
        model(augment(imgs, g), generator=g).loss.backward()
        opt.step()
        opt.zero_grad()
    return cfg.train.batch_size / seconds_per_call(step, steps)


def seconds_per_call(fn, calls: int) -> float:
    """Seconds per call of `fn`, after two warm-up calls."""
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a CPU step is done when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, n: int, device: torch.device = CPU) -> float:
    """Seconds per call of `step` over `n` calls, the device's queue drained before and after."""
    synchronize(device)
    t = time.perf_counter()
    for _ in range(n):
        step()
    synchronize(device)
    return (time.perf_counter() - t) / n
