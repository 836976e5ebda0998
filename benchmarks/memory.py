"""Peak training memory per image of MAE ViT-B/16 and ViT-L/16, with and without activation
checkpointing (`train.grad_checkpointing`, per block, `torch.utils.checkpoint` non-reentrant).

Each measurement is a fresh process that builds the model and fused AdamW and runs two training
steps (fp32, mask 0.75) at one batch size, then reports its peak memory:
  CPU   the process's resident-set high-water mark (`resource.getrusage(...).ru_maxrss`; torch has no
        CPU allocator statistics), which includes the interpreter, libraries, weights, gradients and
        optimizer state;
  CUDA  `torch.cuda.max_memory_allocated()` (the caching allocator's own count of live tensors).
Two batch sizes are run and memory per image is the slope (peak(B2) - peak(B1)) / (B2 - B1): the
activations saved for backward, with everything fixed cancelling out. `fixed` is the intercept.

    python benchmarks/memory.py                         # ViT-B and ViT-L, batches 4 and 8, on the CPU
    python benchmarks/memory.py --device cuda --batches 32 64
    python benchmarks/memory.py --quick                 # smoke test: a 2-block 32 px model
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

import torch

from common import machine, write_report
from mimkit.models import build_model
from mimkit.train.loop import checkpoint_blocks

MODELS = {
    "vit_b16": dict(preset="mae_vit_base_patch16"),
    "vit_l16": dict(preset="mae_vit_large_patch16"),
    "quick": dict(preset="mae_vit_tiny_cifar_patch4", depth=2, decoder_depth=1),
}


def measure(name: str, checkpointing: bool, batch: int, device: str) -> int:
    """Peak bytes of two training steps (run in a fresh process by `main`)."""
    torch.manual_seed(0)
    model = build_model("mae", MODELS[name]).to(device).train()
    if checkpointing:
        checkpoint_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    imgs = torch.randn(batch, 3, *model.img_size, device=device)
    g = torch.Generator().manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        model(imgs, generator=g).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(name: str, checkpointing: bool, batch: int, device: str) -> int:
    cmd = [sys.executable, __file__, "--child", name, str(int(checkpointing)), str(batch), device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_b16", "vit_l16"], choices=list(MODELS))
    parser.add_argument("--batches", nargs=2, type=int, default=[4, 8], metavar=("B1", "B2"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke test: a 2-block 32 px model")
    parser.add_argument("--out", default=None, help="JSON report (default benchmarks/results/memory[_quick].json)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, ckpt, batch, device = args.child
        print(measure(name, ckpt == "1", int(batch), device))
        return
    if args.quick:
        args.models = ["quick"]
    b1, b2 = args.batches
    out = Path(args.out or f"benchmarks/results/memory{'_quick' if args.quick else ''}.json")
    how = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (getrusage ru_maxrss)"
    report = {**machine(), "device": args.device, "measure": how, "batches": [b1, b2], "models": {}}
    print(f"memory: {how}; per image = slope between batches {b1} and {b2}")
    print(f"{'model':<8} {'checkpointing':<14} {'MiB/image':>10} {'fixed MiB':>10} {f'peak MiB @{b2}':>13}")
    for name in args.models:
        for ckpt in (False, True):
            p1, p2 = child(name, ckpt, b1, args.device), child(name, ckpt, b2, args.device)
            per_image = (p2 - p1) / (b2 - b1)
            r = {"peak_bytes": {str(b1): p1, str(b2): p2}, "bytes_per_image": per_image,
                 "fixed_bytes": p1 - b1 * per_image}
            report["models"].setdefault(name, {})["checkpointing" if ckpt else "plain"] = r
            mib = 2**20
            print(f"{name:<8} {'on' if ckpt else 'off':<14} {per_image / mib:>10.1f} {r['fixed_bytes'] / mib:>10.0f} "
                  f"{p2 / mib:>13.0f}")
        m = report["models"][name]
        m["reduction"] = m["plain"]["bytes_per_image"] / max(m["checkpointing"]["bytes_per_image"], 1)
        print(f"{name:<8} activation memory per image / {m['reduction']:.1f} with checkpointing")
    write_report(report, out)


if __name__ == "__main__":
    main()
