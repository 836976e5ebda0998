"""Does mimkit's pretraining learn? CIFAR-10 quality in a fixed CPU budget, against baselines.

For each run (recipe `configs/pretrain/<method>_vit_tiny_cifar10.yaml`, CIFAR-tiny model; `<method>+<variant>`
adds the overrides of one entry of SWEEP, the recorded sweep of each recipe):
  1. pretrain on the full CIFAR-10 train split for `--minutes` of wall-clock time (the number of
     steps is calibrated from a short timing run of the run's own config so that its cosine schedule
     ends on time, whatever its speed), keeping about `--points` checkpoints along the way;
  2. evaluate every checkpoint with kNN (k=20, T=0.07) and a linear probe on frozen features:
     a curve against wall time;
  3. fine-tune the final encoder for `--finetune-minutes`.
Baselines in the same run: kNN on raw normalised pixels, the same encoder at random
initialisation (kNN and linear probe), and fine-tuning from scratch with the same budget.
Every phase writes its JSON under `--out` and is skipped when that JSON exists, so an
interrupted run resumes where it stopped. Prints a table, writes results.json and PNG curves.

    python benchmarks/cifar10_quality.py --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/cifar10_quality.py --data ... --methods mae --minutes 30 --phases pretrain
    python benchmarks/cifar10_quality.py --data ... --methods mae mae+bs128 mae+lr2x --minutes 4 --points 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from common import pretrain_images_per_s, run_phase, steps_for
from mimkit.config import load_config

ROOT = Path(__file__).parents[1]
PHASES = ("pretrain", "curve", "baselines", "finetune", "report")
N_TRAIN = 50_000

# The small sweep of each CIFAR recipe (issues 18 and 19), run as `--methods <method>+<variant>` at a short budget:
# variant -> overrides of configs/pretrain/<method>_vit_tiny_cifar10.yaml as it was when the sweep ran. What each
# reached, and which won, is in BENCHMARKS.md ("Tuning the CIFAR recipes").
SWEEP = {
    "mae": {"bs128": ["train.batch_size=128", "train.blr=3.0e-3"],  # twice the steps at the same lr
            "lr2x": ["train.blr=3.0e-3"], "dec2": ["model.decoder_depth=2"], "normpix": ["model.norm_pix_loss=true"]},
    "cae": {"bs64": ["train.batch_size=64", "train.blr=4.0e-3"], "lr2x": ["train.blr=4.0e-3"]},
    "simmim": {"bs128": ["train.batch_size=128", "train.blr=2.0e-3"], "lr2x": ["train.blr=2.0e-3"]},
    "ijepa": {"bs128": ["train.batch_size=128", "train.blr=2.0e-3"], "lr2x": ["train.blr=2.0e-3"]},
    "data2vec2": {"cls0": ["model.cls_loss=0"], "masks4": ["model.num_masks=4", "train.batch_size=128"]},
}


def recipe_of(run: str) -> tuple[Path, list[str]]:
    """The recipe and the sweep's overrides of a run name: `mae`, or `mae+bs128` (one entry of SWEEP)."""
    method, _, variant = run.partition("+")
    recipe = ROOT / "configs" / "pretrain" / f"{method}_vit_tiny_cifar10.yaml"
    if not recipe.is_file():
        raise SystemExit(f"no recipe {recipe} for run {run!r}")
    if variant and variant not in SWEEP.get(method, {}):
        raise SystemExit(f"unknown variant {variant!r} of {method}: choose from {sorted(SWEEP.get(method, {}))}")
    return recipe, SWEEP[method][variant] if variant else []


def phase_pretrain(run: str, args, out: Path) -> dict:
    from mimkit.train.loop import pretrain

    recipe, variant = recipe_of(run)
    base = [f"data.root={args.data}", f"out_dir={out / run}", "train.vis_images=8", *variant]
    cfg = load_config(recipe, base)
    per_epoch = N_TRAIN // cfg.train.batch_size
    # A step budget from this config's own speed, so that every run's cosine schedule ends at the same wall time
    # (`train.max_minutes` still stops a run that calibrated fast); or whole epochs with --epochs.
    steps = args.epochs * per_epoch if args.epochs else steps_for(args.minutes, pretrain_images_per_s(cfg),
                                                                  cfg.train.batch_size)
    epochs = steps / per_epoch
    overrides = base + [f"train.schedule_steps={steps}", f"train.warmup_epochs={min(1.0, epochs / 5):.4f}",
                        f"train.max_minutes={args.minutes}", f"train.ckpt_every={max(1, steps // args.points)}",
                        "train.keep_last=1000"]
    print(f"[{run}] pretraining {steps} steps ({epochs:.2f} epochs) in at most {args.minutes} min")
    summary = pretrain(load_config(recipe, overrides), resume="auto")
    return {"recipe": str(recipe.relative_to(ROOT)), "overrides": overrides, "epochs": epochs,
            "scheduled_steps": steps, "steps": summary["step"], "final_loss": summary["loss"]}


def eval_config(protocol: str, args, out_dir: Path, checkpoint: str = "", extra: list[str] = ()):
    from mimkit.eval.config import load_eval_config

    recipe = ROOT / "configs" / "eval" / {"knn": "knn_cifar10.yaml", "linprobe": "linear_cifar10.yaml",
                                          "finetune": "finetune_cifar10.yaml"}[protocol]
    limit = [f"data.limit={args.probe_train_images}"] if protocol != "finetune" and args.probe_train_images else []
    return load_eval_config(protocol, recipe, [f"data.root={args.data}", f"out_dir={out_dir}",
                                               f"checkpoint={checkpoint}", *limit, *extra])


def knn_and_linear(ctx, pool: str, out_dir: Path) -> dict:
    """kNN and linear probe of `ctx.encoder` on features computed once."""
    from mimkit.eval import linear
    from mimkit.eval.context import accuracy, features_of
    from mimkit.eval.knn import knn_scores

    cached = features_of(ctx, pool)
    bank, bank_labels, queries, labels = cached
    p = ctx.cfg.probe
    knn = accuracy(knn_scores(bank, bank_labels, queries, ctx.num_classes, p.k, p.temperature), labels)
    ctx = dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, out_dir=str(out_dir)))
    lin = linear.run(ctx, cached=cached)
    return {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "linear_top1": lin["top1"], "linear_top5": lin["top5"],
            "linear_best_top1": lin["best"]["top1"]}


def phase_curve(method: str, args, out: Path) -> dict:
    """kNN and linear probe (cls token) at every checkpoint kept along pretraining, against wall time."""
    from mimkit.eval.context import build_context
    from mimkit.metrics import read_metrics
    from mimkit.train import checkpoint

    run = out / method
    times = {r["step"]: r["time_s"] for r in read_metrics(run / "metrics.jsonl") if "time_s" in r}
    rows = []
    kept = checkpoint.list_checkpoints(run / "checkpoints")
    chosen = [kept[round(i * (len(kept) - 1) / (args.points - 1))] for i in range(args.points)] \
        if len(kept) > 1 and args.points > 1 else kept[-1:]
    for path in sorted(set(chosen)):
        step = int(path.stem.split("-")[1])
        ctx = build_context(eval_config("linprobe", args, run / "curve" / str(step), str(path)))
        for pool in ("cls", "mean") if path == kept[-1] else ("cls",):
            row = {"step": step, "minutes": times.get(step, float("nan")) / 60, "pool": pool,
                   **knn_and_linear(ctx, pool, run / "curve" / f"{step}-{pool}")}
            print(f"[{method}] {row}")
            rows.append(row)
    return {"rows": rows}


def phase_baselines(args, out: Path) -> dict:
    """kNN on raw normalised pixels; kNN and linear probe of the CIFAR-tiny encoder at random init."""
    from mimkit.eval.context import accuracy, build_context
    from mimkit.eval.knn import knn_scores
    from mimkit.models import build_model

    torch.manual_seed(0)
    model = build_model("mae", preset="mae_vit_tiny_cifar_patch4")  # the CIFAR-tiny encoder, untrained
    ctx = build_context(eval_config("linprobe", args, out / "random_init"), model=model)
    result = {f"random_init_{pool}": knn_and_linear(ctx, pool, out / "random_init" / pool) for pool in ("cls", "mean")}
    pixels = {}
    for split, dataset in (("bank", ctx.train_set), ("queries", ctx.val_set)):
        x = ctx.transform(dataset.images).flatten(1)  # normalised pixels (N, 3072)
        pixels[split] = (x, dataset.labels)
    scores = knn_scores(*pixels["bank"], pixels["queries"][0], ctx.num_classes, 20, 0.07)
    result["raw_pixels_knn"] = accuracy(scores, pixels["queries"][1])
    print(f"[baselines] {result}")
    return result


def phase_finetune(method: str, args, out: Path, scratch: bool) -> dict:
    """Fine-tune the final encoder (or the same architecture from scratch) within the budget."""
    from mimkit.eval.run import evaluate
    from mimkit.train import checkpoint

    final = checkpoint.list_checkpoints(out / method / "checkpoints")[-1]
    images = int(args.finetune_minutes * 60 * args.finetune_images_per_s)
    name = "scratch" if scratch else f"{method}_pretrained"
    cfg = eval_config("finetune", args, out / f"finetune_{name}", str(final), [
        f"data.limit={min(images, 50_000)}", "train.epochs=1", "train.warmup_epochs=0.1",
        f"train.max_minutes={1.5 * args.finetune_minutes}", f"finetune.scratch={str(scratch).lower()}"])
    result = evaluate(cfg)
    return {"top1": result["top1"], "top5": result["top5"], "images": min(images, 50_000), "steps": result["steps"]}


def report(args, out: Path, results: dict) -> None:
    """Print the table, write results.json and the curves picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["baselines"]
    lines = [f"{'encoder':<44} {'kNN top1':>9} {'linear top1':>12}",
             f"{'raw normalised pixels':<44} {base['raw_pixels_knn']['top1']:>9.2f} {'-':>12}"]
    for pool in ("cls", "mean"):
        r = base[f"random_init_{pool}"]
        lines.append(f"{'random init (' + pool + ')':<44} {r['knn_top1']:>9.2f} {r['linear_top1']:>12.2f}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for method in args.methods:
        rows = results[f"{method}_curve"]["rows"]
        for row in rows:
            label = f"{method} step {row['step']} ({row['minutes']:.0f} min, {row['pool']})"
            lines.append(f"{label:<44} {row['knn_top1']:>9.2f} {row['linear_top1']:>12.2f}")
        cls_rows = [r for r in rows if r["pool"] == "cls"]
        for ax, key in zip(axes, ("knn_top1", "linear_top1")):
            ax.plot([r["minutes"] for r in cls_rows], [r[key] for r in cls_rows], marker="o", label=method)
    for ax, key, title in zip(axes, ("knn_top1", "linear_top1"), ("kNN (k=20, T=0.07)", "linear probe")):
        ax.axhline(base["random_init_cls"][key], color="grey", ls="--", label="random init")
        if key == "knn_top1":
            ax.axhline(base["raw_pixels_knn"]["top1"], color="black", ls=":", label="raw pixels")
        ax.set(xlabel="pretraining wall time (min)", ylabel="CIFAR-10 top-1 (%)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    lines.append("")
    lines.append(f"{'fine-tuning (same budget)':<44} {'top1':>9} {'images':>12}")
    for key in [k for k in results if k.startswith("finetune_")]:
        r = results[key]
        lines.append(f"{key[9:]:<44} {r['top1']:>9.2f} {r['images']:>12}")
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10: the shared JPEG .tar.gz, a folder or 'download'")
    parser.add_argument("--methods", nargs="+", default=["mae"],
                        help="runs: <m> (recipe configs/pretrain/<m>_vit_tiny_cifar10) or <m>+<variant> of SWEEP")
    parser.add_argument("--minutes", type=float, default=60.0, help="pretraining budget per method")
    parser.add_argument("--epochs", type=int, default=0,
                        help="pretraining epochs (0 = calibrate from a timing run; a busy machine calibrates low)")
    parser.add_argument("--finetune-minutes", type=float, default=10.0, help="budget of each fine-tuning run")
    parser.add_argument("--finetune-images-per-s", type=float, default=40.0,
                        help="fine-tuning speed assumed to size its data to the budget (max_minutes guards it)")
    parser.add_argument("--points", type=int, default=6, help="checkpoints evaluated along pretraining")
    parser.add_argument("--probe-train-images", type=int, default=0,
                        help="kNN bank / linear-probe training images, spread over the classes (0 = all 50,000); "
                             "features cost about one training step per image on a CPU")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--out", default="benchmarks/results/cifar10_quality")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in args.methods:
        if "pretrain" in args.phases:
            results[f"{method}_pretrain"] = run_phase(f"{method}_pretrain", out, phase_pretrain, method, args, out)
        if "curve" in args.phases:
            results[f"{method}_curve"] = run_phase(f"{method}_curve", out, phase_curve, method, args, out)
    if "baselines" in args.phases:
        results["baselines"] = run_phase("baselines", out, phase_baselines, args, out)
    if "finetune" in args.phases:
        results["finetune_scratch"] = run_phase("finetune_scratch", out, phase_finetune, args.methods[0], args, out,
                                                True)
        for method in args.methods:
            results[f"finetune_{method}_pretrained"] = run_phase(f"finetune_{method}_pretrained", out, phase_finetune,
                                                                 method, args, out, False)
    if "report" in args.phases:
        report(args, out, results)


if __name__ == "__main__":
    main()
