"""Where pretraining pays: CIFAR-10 with few labels, at equal compute (issue 19).

Every training image is available unlabelled; labels are kept for `--labels` of them (500 = 1%,
5,000 = 10%; the same number per class, drawn at random with each seed). For each method of
`--methods` (recipes `configs/pretrain/<method>_vit_tiny_cifar10.yaml`):
  1. pretrain on all 50,000 images for `--pretrain-minutes`;
  2. fine-tune the encoder on the labelled images for `--finetune-minutes` (recipe
     `configs/eval/finetune_cifar10_few_labels.yaml`), and linear-probe its frozen features;
against supervised training from scratch on the same labelled images, (a) for the same fine-tuning
budget and (b) for the fine-tuning budget plus the pretraining budget: equal total compute.
Test accuracy on the whole test split (`--test-images` fewer for a pilot).

Budgets are minutes of this machine turned into optimizer steps once, from a timing of each
recipe's training step at the start (`speeds.json`), so every run's schedule ends where its budget
does and the results do not depend on what else the machine was doing later; the wall time each
run took is recorded beside it. Every phase writes its JSON under `--out` and is skipped when that
JSON exists, so an interrupted run resumes where it stopped. Prints a table, writes results.json
and a picture of accuracy against total compute.

    python benchmarks/few_labels.py --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/few_labels.py --quick --out /tmp/few.json   # smoke test on the shipped subset

With `--variants`, the run is the fine-tuning sweep instead: each method's encoder (pretrained here, or
a checkpoint given with `--init <method>=<path>`) fine-tuned with the recipe and with each FT_SWEEP
variant; no probes and no scratch runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shutil
import statistics
import time
from pathlib import Path

import torch

from common import machine, pretrain_images_per_s, run_phase, seconds_per_call, steps_for, write_report
from mimkit.config import load_config

ROOT = Path(__file__).parents[1]
FINETUNE_RECIPE = ROOT / "configs" / "eval" / "finetune_cifar10_few_labels.yaml"
LINEAR_RECIPE = ROOT / "configs" / "eval" / "linear_cifar10.yaml"
POOL = {"mae": "mean", "cae": "cls", "simmim": "mean", "ijepa": "mean", "data2vec2": "mean", "scratch": "mean"}
"""Linear probe pooling per method: where each one's CIFAR-10 representation sits (BENCHMARKS.md)."""
# The fine-tuning sweep (issue 19): variant -> overrides of the fine-tuning recipe as it was when the sweep ran;
# the outcome is in BENCHMARKS.md ("Tuning the CIFAR recipes").
FT_SWEEP = {"ld90": ["finetune.layer_decay=0.9"], "ld100": ["finetune.layer_decay=1.0"],
            "lr2x": ["train.blr=4.0e-3"]}


def phase_speeds(args) -> dict:
    """Images per second of each pretraining recipe and of the fine-tuning recipe, on random images."""
    from mimkit.eval.config import load_eval_config
    from mimkit.eval.context import vit_from
    from mimkit.eval.finetune import FinetuneAugment, mix
    from mimkit.models import build_model
    from mimkit.train.optim import build_adamw

    speeds = {m: pretrain_images_per_s(load_config(pretrain_recipe(m)), args.timing_steps) for m in args.methods}
    cfg = load_eval_config("finetune", FINETUNE_RECIPE)
    vit = vit_from(build_model("mae", preset="mae_vit_tiny_cifar_patch4"), num_classes=10, global_pool="avg",
                   drop_path_rate=cfg.finetune.drop_path)
    opt = build_adamw(vit, 1e-4, 0.05, (0.9, 0.999), layer_decay=cfg.finetune.layer_decay)
    augment = FinetuneAugment(vit.img_size, cfg.finetune, cfg.data.scale, cfg.data.ratio, cfg.data.mean, cfg.data.std)
    bs, g = cfg.train.batch_size, torch.Generator().manual_seed(0)
    imgs, labels = torch.randint(0, 256, (bs, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (bs,))

    def finetune_step():
        x, y = mix(augment(imgs, g), labels, 10, cfg.finetune, g)
        torch.sum(-y * vit(x).log_softmax(dim=-1), dim=-1).mean().backward()
        opt.step()
        opt.zero_grad()
    speeds["finetune"] = bs / seconds_per_call(finetune_step, args.timing_steps)
    print(f"[speeds] images/s: {speeds}")
    return {"images_per_s": speeds, **machine()}


def pretrain_recipe(method: str) -> Path:
    return ROOT / "configs" / "pretrain" / f"{method}_vit_tiny_cifar10.yaml"


def phase_pretrain(method: str, args, out: Path, speeds: dict) -> dict:
    from mimkit.train.loop import pretrain

    if method in args.init:
        return {"checkpoint": args.init[method], "steps": None, "given": True}
    recipe = pretrain_recipe(method)
    cfg = load_config(recipe)
    batch, n_train = cfg.train.batch_size, 3000 if args.quick else 50_000
    steps = args.quick_steps or steps_for(args.pretrain_minutes, speeds[method], batch)
    epochs = steps * batch / n_train
    overrides = [f"data.root={args.data}", f"out_dir={out / method}", "train.vis_images=0",
                 f"train.schedule_steps={steps}", f"train.warmup_epochs={0.2 * epochs:.4f}", "train.keep_last=1",
                 f"train.ckpt_every={steps}"]
    print(f"[{method}] pretraining {steps} steps ({epochs:.2f} epochs)")
    summary = pretrain(load_config(recipe, overrides), resume="auto")
    return {"recipe": str(recipe.relative_to(ROOT)), "overrides": overrides, "steps": summary["step"],
            "epochs": epochs, "final_loss": summary["loss"], "checkpoint": str(summary["checkpoint"])}


def labelled_subset(dataset, per_class: int, seed: int):
    """`per_class` images of each class, drawn at random with `seed` (the same draw for every encoder)."""
    from mimkit.data.cifar import CIFAR10

    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(len(dataset.classes)):
        where = (dataset.labels == c).nonzero().flatten()
        keep.append(where[torch.randperm(len(where), generator=g)[:per_class]])
    keep = torch.cat(keep).sort().values
    return CIFAR10(dataset.images[keep], dataset.labels[keep], dataset.split)


def context(args, protocol: str, recipe: Path, out_dir: Path, encoder: str, pretrained: dict,
            overrides: list[str] = ()):
    """The evaluation context of `encoder` (a method's pretrained checkpoint, or "scratch": the CIFAR-tiny
    encoder at random initialisation) with a recipe and overrides."""
    from mimkit.eval.config import load_eval_config
    from mimkit.eval.context import build_context
    from mimkit.models import build_model

    checkpoint = pretrained[encoder]["checkpoint"] if encoder != "scratch" else ""
    cfg = load_eval_config(protocol, recipe, [f"data.root={args.data}", f"out_dir={out_dir}",
                                              f"checkpoint={checkpoint}", *overrides])
    model = None
    if encoder == "scratch":
        torch.manual_seed(0)
        model = build_model("mae", preset="mae_vit_tiny_cifar_patch4")
    ctx = build_context(cfg, model=model)
    if args.test_images < len(ctx.val_set):
        from mimkit.data.folder import spread

        keep = spread(len(ctx.val_set), args.test_images)
        ctx = dataclasses.replace(ctx, val_set=type(ctx.val_set)(ctx.val_set.images[keep], ctx.val_set.labels[keep],
                                                                  ctx.val_set.split))
    return ctx


def finetune_name(encoder: str, labels: int, seed: int, minutes: float, variant: str = "") -> str:
    return f"finetune_{encoder}_{labels}_{seed}_{minutes:g}min" + (f"+{variant}" if variant else "")


def phase_finetune(args, out: Path, pretrained: dict, speeds: dict, encoder: str, labels: int, seed: int,
                   minutes: float, variant: str = "") -> dict:
    """Fine-tune `encoder` (or train from scratch) on `labels` labelled images for `minutes`, with the recipe or
    one FT_SWEEP `variant` of it."""
    from mimkit.eval.config import load_eval_config
    from mimkit.eval.finetune import run

    recipe = load_eval_config("finetune", FINETUNE_RECIPE)
    batch = min(recipe.train.batch_size, labels // 4)
    steps = args.quick_steps or steps_for(minutes, speeds["finetune"], batch)
    per_epoch = labels // batch
    name = finetune_name(encoder, labels, seed, minutes, variant)
    overrides = [f"train.batch_size={batch}", f"train.schedule_steps={steps}", f"train.seed={seed}",
                 f"train.warmup_epochs={0.05 * steps / per_epoch:.4f}", "val_every=0", "train.keep_last=1",
                 f"finetune.scratch={str(encoder == 'scratch').lower()}"]
    if encoder == "scratch":
        overrides.append("finetune.layer_decay=1.0")  # a network trained from scratch has no layers to protect
    overrides += FT_SWEEP[variant] if variant else []
    shutil.rmtree(out / name, ignore_errors=True)  # what an interrupted attempt left (its JSON was never written)
    ctx = context(args, "finetune", FINETUNE_RECIPE, out / name, encoder, pretrained, overrides)
    ctx = dataclasses.replace(ctx, train_set=labelled_subset(ctx.train_set, labels // 10, seed))
    start = time.perf_counter()
    result = run(ctx)
    print(f"[{name}] top-1 {result['top1']:.2f}")
    return {"encoder": encoder, "labels": labels, "seed": seed, "minutes": minutes, "variant": variant,
            "steps": result["steps"], "batch": batch, "top1": result["top1"], "top5": result["top5"],
            "wall_minutes": (time.perf_counter() - start) / 60, "overrides": overrides}


def phase_linear(args, out: Path, pretrained: dict, encoder: str, labels: int, seed: int) -> dict:
    """Linear probe of the frozen `encoder` on `labels` labelled images (test features computed once)."""
    from mimkit.eval import linear
    from mimkit.eval.features import extract

    pool = POOL[encoder]
    name = f"linear_{encoder}_{labels}_{seed}"
    batch = min(256, labels // 4)
    shutil.rmtree(out / name, ignore_errors=True)
    # LARS at lr 12.8: the recipe's lr (0.1 x batch / 256) left the head near chance in these few hundred steps
    # (MAE features, 500 labels: 14.2% at lr 0.05, 22.4 at 0.4, 28.3 at 6.4, 29.3 at 25.6; BENCHMARKS.md).
    ctx = context(args, "linprobe", LINEAR_RECIPE, out / name, encoder, pretrained,
                  [f"probe.pool={pool}", f"train.batch_size={batch}", "train.epochs=100", "train.warmup_epochs=10",
                   "train.lr=12.8", "val_every=0", f"train.seed={seed}"])
    subset = labelled_subset(ctx.train_set, labels // 10, seed)
    cache = out / f"test_features_{encoder}_{pool}.pt"
    if cache.exists():
        test = torch.load(cache)
    else:
        test = extract(ctx.encoder, ctx.val_set, ctx.transform, pool, 256, 0)
        torch.save(test, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)  # whole or absent, whenever the run is stopped
    cached = (*extract(ctx.encoder, subset, ctx.transform, pool, 256, 0), *test)
    result = linear.run(dataclasses.replace(ctx, train_set=subset), cached=cached)
    print(f"[{name}] top-1 {result['top1']:.2f}")
    return {"encoder": encoder, "labels": labels, "seed": seed, "pool": pool, "top1": result["top1"]}


def summarise(rows: list[dict]) -> dict:
    tops = [r["top1"] for r in rows]
    return {"mean": statistics.fmean(tops), "spread": max(tops) - min(tops), "n": len(tops), "top1": tops}


def report(args, out: Path, results: dict) -> None:
    """The table (mean and spread over seeds per setting), margins, results.json and the picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, table, margins = args.pretrain_minutes, {}, {}
    lines = [f"{'labels':>6} {'encoder':<26} {'compute (min)':>13} {'top-1 mean':>10} {'spread':>7} {'seeds':>5}"]
    fig, axes = plt.subplots(1, len(args.labels), figsize=(5 * len(args.labels), 3.6), squeeze=False)
    for ax, (labels, f) in zip(axes[0], zip(args.labels, args.finetune_minutes, strict=True)):
        settings = {"scratch, same fine-tuning budget": ("finetune", "scratch", f, f),
                    "scratch, equal total compute": ("finetune", "scratch", f + p, f + p)}
        for m in args.methods:
            settings[f"{m} + fine-tuning"] = ("finetune", m, f, f + p)
            settings[f"{m} + linear probe"] = ("linear", m, None, p)
        settings["random init + linear probe"] = ("linear", "scratch", None, 0.0)
        for label, (kind, encoder, minutes, compute) in settings.items():
            rows = [r for r in results.values() if r["kind"] == kind and r["encoder"] == encoder
                    and not r.get("variant") and r["labels"] == labels and (minutes is None or r["minutes"] == minutes)]
            if not rows:
                continue
            s = table[f"{labels}/{label}"] = {**summarise(rows), "compute_minutes": compute}
            lines.append(f"{labels:>6} {label:<26} {compute:>13.1f} {s['mean']:>10.2f} {s['spread']:>7.2f} {s['n']:>5}")
            ax.errorbar([compute], [s["mean"]], yerr=[[s["mean"] - min(s["top1"])], [max(s["top1"]) - s["mean"]]],
                        marker="o" if kind == "finetune" else "s", capsize=3, ls="none", label=label)
        scratch = table.get(f"{labels}/scratch, equal total compute")
        for m in args.methods:
            mine = table.get(f"{labels}/{m} + fine-tuning")
            if mine and scratch:
                margin = mine["mean"] - scratch["mean"]
                margins[f"{labels}/{m}"] = {"margin": margin, "spread": max(mine["spread"], scratch["spread"]),
                                            "beats_spread": margin > max(mine["spread"], scratch["spread"])}
        ax.set(title=f"CIFAR-10, {labels} labels", xlabel="total compute (min of this CPU)", ylabel="test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "few_labels.png", dpi=90)
    lines += ["", "fine-tuning vs scratch at equal total compute (mean difference; spread = the larger of the two)"]
    lines += [f"  {k}: {v['margin']:+.2f} (spread {v['spread']:.2f})" for k, v in margins.items()]
    sweep = {name: r for name, r in results.items() if r.get("variant")}
    if sweep:
        lines += ["", "fine-tuning sweep (variant: overrides of the recipe): top-1"]
        lines += [f"  {name}: {r['top1']:.2f}  {FT_SWEEP[r['variant']]}" for name, r in sweep.items()]
    print("\n".join(lines))
    write_report({**machine(), "args": {k: v for k, v in vars(args).items()}, "table": table, "margins": margins,
                  "phases": results}, Path(args.report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="builtin", help="CIFAR-10: the shared JPEG .tar.gz, a folder or 'download'")
    parser.add_argument("--methods", nargs="+", default=["mae", "cae"])
    parser.add_argument("--pretrain-minutes", type=float, default=10.0)
    parser.add_argument("--labels", nargs="+", type=int, default=[500, 5000], help="labelled images (x10 classes)")
    parser.add_argument("--finetune-minutes", nargs="+", type=float, default=[3.0, 6.0],
                        help="fine-tuning budget for each --labels entry")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="label draws and fine-tuning seeds")
    parser.add_argument("--seeds-large", type=int, default=1, help="seeds for label counts of 5,000 and more")
    parser.add_argument("--test-images", type=int, default=10_000, help="test images scored (all: 10,000)")
    parser.add_argument("--timing-steps", type=int, default=6)
    parser.add_argument("--variants", nargs="*", default=[], choices=sorted(FT_SWEEP),
                        help="the fine-tuning sweep: each method's encoder with the recipe and these variants")
    parser.add_argument("--init", nargs="*", default=[], metavar="METHOD=CHECKPOINT",
                        help="use these pretrained checkpoints instead of pretraining (--pretrain-minutes: their cost)")
    parser.add_argument("--quick", action="store_true", help="smoke test: shipped subset, 2 steps per run")
    parser.add_argument("--dir", default="benchmarks/results/few_labels", help="phases' JSON and runs")
    parser.add_argument("--out", dest="report", default="benchmarks/results/few_labels/results.json")
    args = parser.parse_args()
    args.quick_steps = 0
    if args.quick:
        args.data, args.labels, args.finetune_minutes, args.seeds = "builtin", [100], [0.1], [0, 1]
        args.test_images, args.timing_steps, args.quick_steps = 200, 1, 2
        args.dir = str(Path(args.report).parent / "few_labels_runs")
    if len(args.finetune_minutes) != len(args.labels):
        parser.error(f"--finetune-minutes: one budget per --labels entry ({len(args.labels)}), got "
                     f"{len(args.finetune_minutes)}")
    if any(n % 10 or n < 40 for n in args.labels):
        parser.error(f"--labels: multiples of 10 (the same number per class), at least 40, got {args.labels}")
    if any("=" not in item for item in args.init):
        parser.error(f"--init: METHOD=CHECKPOINT items, got {args.init}")
    args.init = dict(item.split("=", 1) for item in args.init)
    for method, path in args.init.items():
        if method not in args.methods or not Path(path).is_file():
            parser.error(f"--init {method}={path}: the method must be one of --methods {args.methods} and the "
                         "checkpoint an existing file")
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    speeds = run_phase("speeds", out, phase_speeds, args)["images_per_s"]
    pretrained = {m: run_phase(f"{m}_pretrain", out, phase_pretrain, m, args, out, speeds) for m in args.methods}
    results = {}
    for labels, minutes in zip(args.labels, args.finetune_minutes, strict=True):
        seeds = args.seeds if labels < 5000 else args.seeds[:args.seeds_large]
        for seed in seeds:
            if args.variants:
                for m, v in itertools.product(args.methods, ["", *args.variants]):
                    name = finetune_name(m, labels, seed, minutes, v)
                    results[name] = {"kind": "finetune", **run_phase(name, out, phase_finetune, args, out, pretrained,
                                                                     speeds, m, labels, seed, minutes, v)}
                continue
            for encoder in [*args.methods, "scratch"]:
                name = f"linear_{encoder}_{labels}_{seed}"
                results[name] = {"kind": "linear", **run_phase(name, out, phase_linear, args, out, pretrained,
                                                               encoder, labels, seed)}
            runs = [(e, minutes) for e in [*args.methods, "scratch"]] + [("scratch", minutes + args.pretrain_minutes)]
            for encoder, budget in runs:
                name = finetune_name(encoder, labels, seed, budget)
                results[name] = {"kind": "finetune", **run_phase(name, out, phase_finetune, args, out, pretrained,
                                                                 speeds, encoder, labels, seed, budget)}
    report(args, out, results)


if __name__ == "__main__":
    main()
