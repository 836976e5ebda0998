#!/usr/bin/env bash
# The prepared accelerator run (issue 15): every check and measurement in one go, at most ~8 minutes on
# an H200, everything written under RESULTS (default benchmarks/results/gpu), one summary table printed.
#
#   bash benchmarks/gpu.sh [RESULTS] [--device cuda|cpu] [--quick] [--official-mae DIR]
#   bash benchmarks/gpu.sh /tmp/gpu --device cpu --quick     # the smoke test CI runs
#
# --official-mae DIR: a checkout of facebookresearch/mae, timed beside mimkit and transformers (default
# .official/mae when it exists; `.official/` is git-ignored: bring it with the device tool's `carry`). Make it
# where there is a network: git clone https://github.com/facebookresearch/mae .official/mae
#
# Steps (each one's output in RESULTS/<step>.log, its status and seconds in RESULTS/steps.tsv; a failed
# step does not stop the others):
#   tests       tests/test_device.py on the device (MIMKIT_TEST_DEVICE): transformers parity in fp32,
#               bit-exact resume with deterministic algorithms, bf16/fp16 steps, DDP/FSDP2 in one process
#               (NCCL), and timm's `local-dir:` load of a `--to timm` folder (where timm imports)
#   throughput  MAE ViT-B/16, ViT-L/16 and CIFAR-tiny, mimkit (eager and compiled) against transformers'
#               ViTMAE and the official models_mae.py (with --official-mae), bf16 autocast, with the bf16
#               matmul peak of the same run (model FLOP utilisation); CAE ViT-B/16 alone
#   mask_tokens the encoder on visible patches only against mask tokens through it (MAE section 3), bf16
#   memory      peak memory per image of ViT-B/L, with and without activation checkpointing
#   end_to_end  `mimkit pretrain` of the MAE ViT-B/16 recipe from a folder of ImageNet-sized JPEGs with every
#               core as a loader worker, against its synthetic-batch step rate: does the data keep up?
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/gpu DEVICE=cuda QUICK=0 OFFICIAL=.official/mae
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --official-mae) OFFICIAL=$2; shift 2 ;;
        -*) echo "gpu.sh: unknown option $1" >&2; exit 2 ;;
        *) OUT=$1; shift ;;
    esac
done
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
export CUBLAS_WORKSPACE_CONFIG=:4096:8 MIMKIT_TEST_DEVICE=$DEVICE PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: run it, log it, record its status and duration
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
    tail -n 3 "$OUT/$name.log"
}

if [ "$QUICK" = 1 ]; then
    step tests python -m pytest -q -p no:cacheprovider tests/test_device.py -k "transformers or timm_loads" \
        "tests/test_convert.py::test_timm_loads_the_folder_with_equal_features"
    step throughput python benchmarks/throughput.py --device "$DEVICE" --quick --no-compile --out "$OUT/throughput.json"
    step mask_tokens python benchmarks/mask_tokens.py --device "$DEVICE" --quick --out "$OUT/mask_tokens.json"
    step memory python benchmarks/memory.py --device "$DEVICE" --quick --out "$OUT/memory.json"
    step end_to_end python benchmarks/end_to_end.py --quick --out "$OUT/end_to_end.json"
else
    step tests python -m pytest -q -p no:cacheprovider tests/test_device.py \
        "tests/test_convert.py::test_timm_loads_the_folder_with_equal_features"
    step throughput python benchmarks/throughput.py --device "$DEVICE" --precision bf16 --configs vit_b16 cifar_tiny \
        --batch 256 --rounds 3 --steps 5 --official-mae "$OFFICIAL" --out "$OUT/throughput.json"
    step throughput_large python benchmarks/throughput.py --device "$DEVICE" --precision bf16 \
        --configs vit_l16 cae_vit_b16 --batch 128 --rounds 3 --steps 5 --official-mae "$OFFICIAL" \
        --out "$OUT/throughput_large.json"
    step mask_tokens python benchmarks/mask_tokens.py --device "$DEVICE" --precision bf16 --models vit_b16 vit_l16 \
        --batch 64 --rounds 3 --steps 3 --out "$OUT/mask_tokens.json"
    step memory python benchmarks/memory.py --device "$DEVICE" --batches 32 64 --out "$OUT/memory.json"
    step end_to_end python benchmarks/end_to_end.py --device "$DEVICE" --workers "$(nproc)" --batch 256 --steps 30 \
        --out "$OUT/end_to_end.json"
fi

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
print(f"\n{'step':<18} {'status':>6} {'seconds':>8}  result")
for name, rc, secs in rows:
    result = ""
    log = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()
    path = out / f"{name}.json"
    if name == "tests" and log:
        result = log[-1]
    elif path.exists():
        r = json.loads(path.read_text())
        if "configs" in r:
            result = "; ".join(f"{c} {v['mimkit']['images_per_s']:.0f} img/s, "
                               f"{100 * v['mimkit']['gflops'] / r['matmul_peak_gflops']:.0f}% of peak"
                               + (f", {v['speedup_vs_best_reference']:.2f}x best reference"
                                  if "speedup_vs_best_reference" in v else "")
                               for c, v in r["configs"].items())
        elif name == "end_to_end":
            result = (f"{r['end_to_end']['images_per_s']:.0f} img/s from JPEGs, {r['synthetic_images_per_s']:.0f} "
                      f"synthetic: {r['data_keeps_up_ratio']:.2f}")
        elif "models" in r and name == "mask_tokens":
            result = "; ".join(f"{m} {v['speedup']:.2f}x" for m, v in r["models"].items())
        elif "models" in r:
            result = "; ".join(f"{m} {v['plain']['bytes_per_image'] / 2**20:.0f} MiB/img plain, "
                               f"{v['checkpointing']['bytes_per_image'] / 2**20:.0f} checkpointed"
                               for m, v in r["models"].items())
    print(f"{name:<18} {'ok' if rc == '0' else 'FAIL ' + rc:>6} {secs:>8}  {result}")
failed = [name for name, rc, _ in rows if rc != "0"]
(out / "summary.json").write_text(json.dumps({"steps": {n: {"rc": int(rc), "seconds": int(s)} for n, rc, s in rows},
                                              "failed": failed}, indent=2))
print(f"wrote {out / 'summary.json'}")
sys.exit(1 if failed else 0)
PY
