"""Training throughput of mimkit's MAE against transformers' ViTMAEForPreTraining and, with `--official-mae
DIR`, the official MAE code (`models_mae.py` on timm), same weights; and of mimkit's CAE alone (no reference
implementation exists to time it against).

One training step = forward (masking, encoder, decoder, loss) + backward + fused AdamW step, in fp32 or,
with `--precision bf16`, with the forward of every implementation under bf16 autocast (what
`train.precision=bf16` does; on CPUs with AMX or AVX512-BF16 the matmuls run in bf16).
Both implementations are timed in the same process, interleaved round by round so that machine
drift hits both alike; the reported figure is the median over rounds. Achieved GFLOP/s counts the
matmul/conv/attention FLOPs of one step with `torch.utils.flop_counter` and is compared with a
measured fp32 matmul peak on the same machine in the same run. `mimkit_compiled` is the same model
with every block under `torch.compile` (what `train.compile=true` does); its compilation happens in
the warm-up step, outside the timing, and is reported as `compile_s`. The process keeps freed
memory for reuse, as `mimkit pretrain` does on the CPU (`train.keep_memory`, `mimkit.train.malloc`):
a process-wide setting that every implementation's steps enjoy alike (`--no-keep-memory`: off).

    python benchmarks/throughput.py                      # every config
    python benchmarks/throughput.py --configs cifar_tiny --rounds 3
    python benchmarks/throughput.py --configs cae_cifar_tiny
    python benchmarks/throughput.py --configs cifar_tiny vit_b16 --precision bf16
    python benchmarks/throughput.py --quick              # smoke test: tiny batch, one round, short peak
    python benchmarks/throughput.py --device cuda --precision bf16 --configs vit_b16 vit_l16 --batch 256

On a GPU (`--device cuda`) steps are timed with the device's queue drained, and the peak is a bf16 (or
fp32) matmul on that GPU.

The official code is an input, never part of mimkit: `--official-mae DIR` is a checkout of
facebookresearch/mae (e.g. `git clone https://github.com/facebookresearch/mae .official/mae`; `.official/`
is git-ignored). It was written for timm 0.3.2; two shims, kept here, run it on timm 1.x and NumPy 2:
timm's `Block` no longer takes `qk_scale` (models_mae passes None, the default it had), and NumPy no
longer has `np.float` (util/pos_embed.py). Without timm (it needs torchvision) or DIR the comparison is
skipped and the report says why. Its masks come from its own `torch.rand` (it takes no noise), which
costs it nothing more than mimkit's.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common import CPU, machine, time_steps, write_report
from mimkit.export import hf_config_from_mae, mae_to_hf
from mimkit.models import build_model
from mimkit.train.loop import compile_blocks
from mimkit.train.malloc import keep_freed_memory

CONFIGS = {
    "cifar_tiny": dict(model=dict(preset="mae_vit_tiny_cifar_patch4"), batch=128),
    "vit_b16": dict(model=dict(preset="mae_vit_base_patch16"), batch=16),
    "vit_l16": dict(model=dict(preset="mae_vit_large_patch16"), batch=8),
    # CAE recipe model (block masks 32/64, regressor 2 + decoder 2, norm-pix): timed alone, fixed masks.
    "cae_cifar_tiny": dict(method="cae", model=dict(preset="cae_vit_tiny_cifar_patch4", mask_min_block=5), batch=128),
    "cae_vit_b16": dict(method="cae", model=dict(preset="cae_vit_base_patch16"), batch=16),
}


def matmul_peak(n: int = 2048, seconds: float = 3.0, dtype: torch.dtype = torch.float32,
                device: torch.device = CPU) -> float:
    """Best GFLOP/s of an n x n matmul in `dtype` on `device` over repeated runs (8 per timing on a GPU)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    reps = 8 if device.type == "cuda" else 1
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        best = max(best, 2 * n**3 / time_steps(lambda: a @ b, reps, device) / 1e9)
    return best


def autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def load_official_mae(checkout: str | None):
    """(the official `models_mae` module from a facebookresearch/mae checkout, None), or (None, why not)."""
    if not checkout:
        return None, "no --official-mae checkout given"
    path = Path(checkout).resolve()
    if not (path / "models_mae.py").is_file() or not (path / "util" / "pos_embed.py").is_file():
        return None, f"{path} is not a facebookresearch/mae checkout (models_mae.py, util/pos_embed.py)"
    try:
        import timm.models.vision_transformer as timm_vit
    except Exception as e:  # not installed, or its torchvision import fails beside this torch
        return None, f"timm does not import here ({type(e).__name__}: {e})"
    import numpy as np

    if "float" not in np.__dict__:
        np.float = float  # shim: util/pos_embed.py's np.arange(..., dtype=np.float); NumPy 1.24 removed the alias
    spec = importlib.util.spec_from_file_location("models_mae", path / "models_mae.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path))  # `from util.pos_embed import ...`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path))

    class Block(timm_vit.Block):
        """shim: timm >= 0.9's Block has no `qk_scale`; models_mae passes qk_scale=None, the old default."""

        def __init__(self, *args, qk_scale=None, **kwargs):
            super().__init__(*args, **kwargs)

    module.Block = Block
    return module, None


def official_twin(models_mae, ours) -> nn.Module:
    """The official MaskedAutoencoderViT with mimkit's architecture and weights (the parameter names are the
    official ones, so the state dict loads strictly)."""
    c = ours.cfg
    twin = models_mae.MaskedAutoencoderViT(
        img_size=ours.img_size[0], patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim, depth=c.depth,
        num_heads=c.num_heads, decoder_embed_dim=c.decoder_embed_dim, decoder_depth=c.decoder_depth,
        decoder_num_heads=c.decoder_num_heads, mlp_ratio=c.mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss=c.norm_pix_loss)
    twin.load_state_dict(ours.state_dict())
    return twin


def make_step(model, loss_of, precision: str = "fp32", device: torch.device = CPU):
    """One training step of `model`, whose loss `loss_of(model)` computes."""
    # The fused kernel for everyone: what mimkit's training loop uses, and transformers' Trainer default
    # (`adamw_torch_fused`) with torch >= 2.8.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            fused=True)

    def step():
        with autocast(precision, device):
            loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def step_flops(step) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def run_config(name: str, rounds: int, steps: int, batch: int | None = None, compiled: bool = True,
               precision: str = "fp32", device: torch.device = CPU, official=None) -> dict:
    """mimkit (eager, and compiled when `compiled`) against transformers' ViTMAE (eager and SDPA attention) and,
    given the `official` models_mae module, the official code."""
    import transformers

    spec = dict(CONFIGS[name], batch=batch or CONFIGS[name]["batch"])
    torch.manual_seed(0)
    ours = build_model("mae", spec["model"]).train().to(device)
    hf_cfg = hf_config_from_mae(ours.cfg)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(spec["batch"], 3, *ours.img_size, generator=g).to(device)
    noise = torch.rand(spec["batch"], ours.patch_embed.num_patches, generator=g).to(device)
    mimkit_loss = lambda m: m(imgs, noise=noise).loss
    contenders = {"mimkit": make_step(ours, mimkit_loss, precision, device)}
    if compiled:
        twin = copy.deepcopy(ours)
        compile_blocks(twin)
        contenders["mimkit_compiled"] = make_step(twin, mimkit_loss, precision, device)
    for attn in ("eager", "sdpa"):
        ref = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**hf_cfg, attn_implementation=attn))
        ref.load_state_dict(mae_to_hf(ours.state_dict()))
        contenders[f"transformers_{attn}"] = make_step(ref.train().to(device),
                                                       lambda m: m(pixel_values=imgs, noise=noise).loss,
                                                       precision, device)
    if official is not None:
        contenders["official_mae"] = make_step(official_twin(official, ours).train().to(device),
                                               lambda m: m(imgs, mask_ratio=ours.cfg.mask_ratio)[0], precision,
                                               device)
    flops = step_flops(contenders["mimkit"])
    warmup = {}
    for k, step in contenders.items():  # warm up allocators and kernels (and compile)
        warmup[k] = time_steps(step, 1, device)
    times = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, step in contenders.items():
            times[k].append(time_steps(step, steps, device))
    result = {"batch": spec["batch"], "flops_per_step": flops}
    if compiled:
        result["compile_s"] = warmup["mimkit_compiled"] - warmup["mimkit"]
    for k, ts in times.items():
        sec = statistics.median(ts)
        result[k] = {"images_per_s": spec["batch"] / sec, "gflops": flops / sec / 1e9, "step_s": ts}
    result["speedup_vs_best_reference"] = result["mimkit"]["images_per_s"] / best_reference(result)
    return result


REFERENCES = ("transformers_eager", "transformers_sdpa", "official_mae")


def best_reference(result: dict) -> float:
    """The images/s of the fastest reference implementation timed in `result`."""
    return max(result[k]["images_per_s"] for k in REFERENCES if k in result)


def run_cae_config(name: str, rounds: int, steps: int, precision: str = "fp32", batch: int | None = None,
                   device: torch.device = CPU) -> dict:
    """mimkit CAE alone: one training step = forward (encoder, alignment target, regressor, decoder, loss)
    with fixed block masks (as MAE's steps get fixed noise) + backward + AdamW step, in `precision`."""
    from mimkit.masking import block_mask, num_kept

    spec = dict(CONFIGS[name], batch=batch or CONFIGS[name]["batch"])
    torch.manual_seed(0)
    model = build_model("cae", spec["model"]).train().to(device)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(spec["batch"], 3, *model.img_size, generator=g).to(device)
    n = model.patch_embed.num_patches
    mask = block_mask(spec["batch"], model.patch_embed.grid_size, n - num_kept(n, model.cfg.mask_ratio),
                      min_block=model.cfg.mask_min_block or None, generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), fused=True)

    def step():
        with autocast(precision, device):
            loss = model(imgs, mask=mask).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = step_flops(step)
    step()
    times = [time_steps(step, steps, device) for _ in range(rounds)]
    sec = statistics.median(times)
    return {"batch": spec["batch"], "flops_per_step": flops,
            "mimkit": {"images_per_s": spec["batch"] / sec, "gflops": flops / sec / 1e9, "step_s": times}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median is reported)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--out", default=None,
                        help="JSON report (default benchmarks/results/throughput[_quick][_bf16].json)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: every forward under bf16 autocast, peak measured in bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant of mimkit")
    parser.add_argument("--no-keep-memory", action="store_true",
                        help="leave glibc's malloc at its defaults (memory returned to the OS at every step)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=0, help="images per step for every config (0: each config's)")
    parser.add_argument("--official-mae", default=None, metavar="DIR",
                        help="a checkout of facebookresearch/mae: time its models_mae.py too (needs timm)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: cifar_tiny at batch 8, one round of one step, a 1-second peak")
    args = parser.parse_args()
    device, batch = torch.device(args.device), args.batch or None
    if args.quick:
        args.configs, args.rounds, args.steps, batch = ["cifar_tiny"], 1, 1, 8
    suffix = ("_quick" if args.quick else "") + ("_bf16" if args.precision == "bf16" else "")
    out = Path(args.out or f"benchmarks/results/throughput{suffix}.json")

    kept = not args.no_keep_memory and keep_freed_memory()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(seconds=1.0 if args.quick else 3.0, dtype=dtype, device=device)
    official, skipped = load_official_mae(args.official_mae)
    report = {**machine(device), "keep_memory": kept, "precision": args.precision, "matmul_peak_gflops": peak,
              "official_mae": skipped or str(Path(args.official_mae).resolve()), "configs": {}}
    print(f"{args.precision} matmul peak: {peak:.1f} GFLOP/s ({report['machine']})")
    if skipped:
        print(f"official MAE code: skipped, {skipped}")
    print(f"{'config':<11} {'implementation':<20} {'images/s':>9} {'GFLOP/s':>8} {'% peak':>7} {'vs best ref':>11}")
    for name in args.configs:
        if CONFIGS[name].get("method") == "cae":
            r = report["configs"][name] = run_cae_config(name, args.rounds, args.steps, args.precision, batch, device)
            x = r["mimkit"]
            print(f"{name:<11} {'mimkit':<20} {x['images_per_s']:>9.1f} {x['gflops']:>8.1f} "
                  f"{100 * x['gflops'] / peak:>6.1f}% {'-':>11}")
            continue
        r = run_config(name, args.rounds, args.steps, batch, compiled=not args.no_compile, precision=args.precision,
                       device=device, official=official)
        report["configs"][name] = r
        best_ref = best_reference(r)
        for impl in [k for k in ("mimkit", "mimkit_compiled", *REFERENCES) if k in r]:
            x = r[impl]
            print(f"{name:<11} {impl:<20} {x['images_per_s']:>9.1f} {x['gflops']:>8.1f} "
                  f"{100 * x['gflops'] / peak:>6.1f}% {x['images_per_s'] / best_ref:>10.2f}x")
    for name, r in report["configs"].items():
        if "compile_s" in r:
            print(f"{name}: compiling the blocks took {r['compile_s']:.0f} s (first step, not timed)")
    write_report(report, out)


if __name__ == "__main__":
    main()
