"""The benchmark scripts run (their --quick smoke modes) and write the report BENCHMARKS.md quotes.

Figures are not asserted here (timings belong in the benchmarks themselves); what is checked is that
each script finishes, and that its JSON has the fields and the arithmetic the tables are built from."""

import dataclasses
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def run(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--out", str(out),
                           *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}" in done.stdout
    report = json.loads(out.read_text())
    assert report["torch"] and report["machine"].endswith(" threads")  # e.g. "AMD EPYC 9B14, 2 threads"
    return report


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_throughput(tmp_path):
    report = run("throughput", tmp_path, "--no-compile", "--official-mae", str(tmp_path))
    assert report["official_mae"].endswith("is not a facebookresearch/mae checkout (models_mae.py, util/pos_embed.py)")
    r = report["configs"]["cifar_tiny"]
    assert "official_mae" not in r  # skipped, and the report says why
    assert r["batch"] == 8 and positive(r["flops_per_step"])
    for impl in ("mimkit", "transformers_eager", "transformers_sdpa"):
        x = r[impl]
        assert positive(x["images_per_s"]) and len(x["step_s"]) == 1
        assert x["gflops"] == pytest.approx(r["flops_per_step"] / x["step_s"][0] / 1e9)
    best = max(r["transformers_eager"]["images_per_s"], r["transformers_sdpa"]["images_per_s"])
    assert r["speedup_vs_best_reference"] == pytest.approx(r["mimkit"]["images_per_s"] / best)


def test_mask_tokens(tmp_path):
    r = run("mask_tokens", tmp_path)["models"]["quick"]
    assert (r["batch"], r["mask_ratio"], r["patches"]) == (8, 0.75, 64)
    assert r["speedup"] == pytest.approx(r["visible"]["images_per_s"] / r["all_tokens"]["images_per_s"])


def test_memory(tmp_path):
    report = run("memory", tmp_path)
    r = report["models"]["quick"]
    assert report["batches"] == [4, 8]
    for mode in ("plain", "checkpointing"):
        peaks = r[mode]["peak_bytes"]
        assert positive(peaks["4"]) and r[mode]["bytes_per_image"] == (peaks["8"] - peaks["4"]) / 4


def test_data_loading(tmp_path):
    sets = run("data_loading", tmp_path)["sets"]
    assert set(sets) == {"photos", "noise"}
    for entry in sets.values():
        assert entry["fidelity"]["min_db"] >= 35 and entry["fidelity"]["crops"] == 8
        runs = entry["runs"]["1"]
        assert set(runs) == {"reference", "before", "workers"}
        for r in runs.values():
            assert positive(r["images_per_s"]) and positive(r["images_per_cpu_s"])
            assert r["per_cpu_vs_before"] == pytest.approx(r["images_per_cpu_s"] / runs["before"]["images_per_cpu_s"])
            assert r["per_cpu_vs_reference"] == pytest.approx(
                r["images_per_cpu_s"] / runs["reference"]["images_per_cpu_s"])


def test_end_to_end(tmp_path):
    r = run("end_to_end", tmp_path)
    assert (r["batch"], r["workers"], r["images"], r["precision"]) == (8, 1, 56, "fp32")
    e2e = r["end_to_end"]
    assert len(e2e["windows"]) == 3 and e2e["images_per_s"] == pytest.approx(statistics.median(e2e["windows"][1:]))
    assert positive(r["synthetic_images_per_s"]) and 5 < r["mean_jpeg_kib"] < 500
    assert r["data_keeps_up_ratio"] == pytest.approx(e2e["images_per_s"] / r["synthetic_images_per_s"])


def test_few_labels(tmp_path):
    report = run("few_labels", tmp_path, "--methods", "mae")
    table, margins = report["table"], report["margins"]
    assert set(table) == {"100/scratch, same fine-tuning budget", "100/scratch, equal total compute",
                          "100/mae + fine-tuning", "100/mae + linear probe", "100/random init + linear probe"}
    for row in table.values():
        assert row["n"] == 2 and row["mean"] == pytest.approx(sum(row["top1"]) / 2)
        assert row["spread"] == pytest.approx(max(row["top1"]) - min(row["top1"]))
    m = margins["100/mae"]
    assert m["margin"] == pytest.approx(table["100/mae + fine-tuning"]["mean"]
                                        - table["100/scratch, equal total compute"]["mean"])
    assert (tmp_path / "few_labels_runs" / "few_labels.png").is_file()


def test_few_labels_finetuning_sweep(tmp_path):
    """--variants: the recipe and each variant fine-tune the given checkpoint; nothing else runs."""
    from mimkit.models import build_model
    from mimkit.train.checkpoint import write_atomic

    torch.manual_seed(0)
    model = build_model("mae", preset="mae_vit_tiny_cifar_patch4")
    ckpt = write_atomic(tmp_path / "mae.pt", {"model": model.state_dict(), "method": "mae",
                                              "config": {"model": dataclasses.asdict(model.cfg)}})
    report = run("few_labels", tmp_path, "--methods", "mae", "--variants", "ld90", "lr2x", "--init", f"mae={ckpt}")
    phases = report["phases"]  # --quick: 100 labels, seeds 0 and 1
    assert set(phases) == {f"finetune_mae_100_{seed}_0.1min{v}" for seed in (0, 1) for v in ("", "+ld90", "+lr2x")}
    assert "finetune.layer_decay=0.9" in phases["finetune_mae_100_0_0.1min+ld90"]["overrides"]
    assert "train.blr=4.0e-3" in phases["finetune_mae_100_1_0.1min+lr2x"]["overrides"]
    assert not any("layer_decay" in o or "blr" in o for o in phases["finetune_mae_100_0_0.1min"]["overrides"])
    assert report["table"]["100/mae + fine-tuning"]["top1"] == [phases[f"finetune_mae_100_{seed}_0.1min"]["top1"]
                                                                for seed in (0, 1)]
    assert not (tmp_path / "few_labels_runs" / "mae").exists()  # the given checkpoint, no pretraining


def test_cifar10_quality_sweep_entries_are_valid_configs():
    """Every variant of the recorded sweep loads as a config (a misspelt key would fail at load time)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from cifar10_quality import SWEEP, recipe_of
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from mimkit.config import load_config

    for method, variants in SWEEP.items():
        for name, overrides in variants.items():
            recipe, got = recipe_of(f"{method}+{name}")
            assert got == overrides and recipe.name == f"{method}_vit_tiny_cifar10.yaml"
            load_config(recipe, got)
    with pytest.raises(SystemExit, match="unknown variant 'nope' of mae: choose from"):
        recipe_of("mae+nope")


def test_gpu_script_runs_its_cpu_smoke_path(tmp_path):
    """`benchmarks/gpu.sh --device cpu --quick`: every step of the accelerator run, tiny, on the CPU."""
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path), "--device", "cpu", "--quick"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["steps"]) == ["tests", "throughput", "mask_tokens", "memory", "end_to_end"]
    assert summary["failed"] == []
    assert "passed" in (tmp_path / "tests.log").read_text()
    assert json.loads((tmp_path / "throughput.json").read_text())["configs"]["cifar_tiny"]["batch"] == 8
