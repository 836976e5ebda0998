"""The MAE paper's speed claim: an encoder that skips the masked patches trains faster than one fed
every token with mask tokens in place of the hidden patches (He et al. 2022, sec. 4 and Table 1c:
2.8x for ViT-L with an 8-block decoder, 4.1x for ViT-H with 1 block, whole-model wall clock on GPUs).

The same MAE model, weights, images and masks (ratio 0.75) run one training step (forward, loss on
the masked patches, backward, fused AdamW step, fp32) in two ways:
  visible     mimkit's MAE: the encoder sees the 49 visible patches of 196 (+ cls);
  all tokens  the paper's ablation "encoder w/ [M]": masked patches are replaced by a learned mask
              token (plus their position) and the encoder sees all 196 (+ cls); the decoder then
              takes the encoder's output for every token (no mask tokens of its own).
The two are timed interleaved, round by round; the median step time is reported.

    python benchmarks/mask_tokens.py                 # ViT-B/16 and ViT-L/16 at 224 px, batch 8
    python benchmarks/mask_tokens.py --models vit_l16 --batch 16 --rounds 5
    python benchmarks/mask_tokens.py --quick         # smoke test: a 2-block model at 32 px
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import Tensor, nn

from common import CPU, machine, time_steps, write_report
from mimkit.masking import random_masking
from mimkit.models import build_model
from mimkit.models.mae import MAE, MAEOutput

MODELS = {
    "vit_b16": dict(preset="mae_vit_base_patch16"),  # decoder 512 x 8 (the paper's default)
    "vit_l16": dict(preset="mae_vit_large_patch16"),
    "quick": dict(preset="mae_vit_tiny_cifar_patch4", depth=2, decoder_depth=1),
}


class AllTokensMAE(nn.Module):
    """The ablation's forward on a mimkit MAE (shared weights): mask tokens go through the encoder."""

    def __init__(self, mae: MAE):
        super().__init__()
        self.mae = mae
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, mae.embed_dim).normal_(std=0.02))

    def forward(self, imgs: Tensor, noise: Tensor) -> MAEOutput:
        m = self.mae
        _, ids_restore, mask = random_masking(imgs.shape[0], m.patch_embed.num_patches, m.cfg.mask_ratio,
                                              noise=noise)
        x = m.patch_embed(imgs)  # (B, N, D)
        x = torch.where(mask.unsqueeze(-1), self.encoder_mask_token.to(x.dtype), x) + m.pos_embed[:, 1:]
        x = m.run_blocks(m.with_cls(x))  # (B, 1 + N, D): every token through every block
        x = m.decoder_embed(x) + m.decoder_pos_embed  # (B, 1 + N, Dd)
        for blk in m.decoder_blocks:
            x = blk(x)
        pred = m.decoder_pred(m.decoder_norm(x))[:, 1:]  # (B, N, P)
        return MAEOutput(loss=m.forward_loss(imgs, pred, mask), pred=pred, mask=mask, ids_restore=ids_restore)


def make_step(model: nn.Module, imgs: Tensor, noise: Tensor, opt: torch.optim.Optimizer, precision: str = "fp32"):
    def step():
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(imgs, noise=noise).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(name: str, batch: int, rounds: int, steps: int, device: torch.device = CPU, precision: str = "fp32") -> dict:
    torch.manual_seed(0)
    mae = build_model("mae", MODELS[name]).train().to(device)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, *mae.img_size, generator=g).to(device)
    noise = torch.rand(batch, mae.patch_embed.num_patches, generator=g).to(device)
    ablation = AllTokensMAE(mae).train().to(device)
    # One optimizer over the shared weights (the visible step leaves the encoder mask token's grad None).
    opt = torch.optim.AdamW(ablation.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    contenders = {"visible": make_step(mae, imgs, noise, opt, precision),
                  "all_tokens": make_step(ablation, imgs, noise, opt, precision)}
    for step in contenders.values():  # warm-up
        time_steps(step, 1, device)
    times = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, step in contenders.items():
            times[k].append(time_steps(step, steps, device))
    out = {"batch": batch, "mask_ratio": mae.cfg.mask_ratio, "patches": mae.patch_embed.num_patches}
    for k, ts in times.items():
        out[k] = {"step_s": statistics.median(ts), "images_per_s": batch / statistics.median(ts), "all_step_s": ts}
    out["speedup"] = out["all_tokens"]["step_s"] / out["visible"]["step_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_b16", "vit_l16"], choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median is reported)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per round")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: forward under autocast")
    parser.add_argument("--quick", action="store_true", help="smoke test: a 2-block 32 px model, one round")
    parser.add_argument("--out", default=None, help="JSON report (default benchmarks/results/mask_tokens[_quick].json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.models, args.batch, args.rounds, args.steps = ["quick"], 8, 1, 1
    out = Path(args.out or f"benchmarks/results/mask_tokens{'_quick' if args.quick else ''}.json")
    report = {**machine(device), "precision": args.precision, "models": {}}
    print(f"{'model':<8} {'batch':>5} {'visible img/s':>14} {'all tokens img/s':>17} {'speedup':>8}")
    for name in args.models:
        r = report["models"][name] = run(name, args.batch, args.rounds, args.steps, device, args.precision)
        visible, all_tokens = r["visible"]["images_per_s"], r["all_tokens"]["images_per_s"]
        print(f"{name:<8} {r['batch']:>5} {visible:>14.2f} {all_tokens:>17.2f} {r['speedup']:>7.2f}x")
    write_report(report, out)


if __name__ == "__main__":
    main()
