"""Evaluation entry point: `evaluate` runs one protocol (`mimkit.eval.knn`, `linear`, `attentive`,
`finetune`) on a checkpoint and writes results.json; the protocols share `mimkit.eval.context`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from mimkit.config import check_run, to_dict
from mimkit.eval import attentive, finetune, knn, linear
from mimkit.eval.config import EvalConfig
from mimkit.eval.context import build_context
from mimkit.train.checkpoint import claim
from mimkit.train.dist import is_main, pick_device, process_group

log = logging.getLogger("mimkit")
PROTOCOLS = {"knn": knn.run, "linprobe": linear.run, "attnprobe": attentive.run, "finetune": finetune.run}


def evaluate(cfg: EvalConfig, resume: str | None = None, model: nn.Module | None = None,
             overwrite: bool = False) -> dict:
    """Run `cfg.protocol` on `cfg.checkpoint` (or on `model`, already loaded from it); write results.json
    (metrics + resolved config) in out_dir. A supervised protocol's out_dir is its run's own (see
    `mimkit.train.checkpoint.claim`): `overwrite` deletes another run's files there first."""
    check_run(cfg)
    run = PROTOCOLS[cfg.protocol]
    device = pick_device(cfg.train.device)  # picked once, here
    with process_group(device):  # under torchrun: every process evaluates its share
        if overwrite and resume is None and is_main():
            claim(cfg.out_dir, None, overwrite=True)
        ctx = build_context(cfg, model, device)
        result = run(ctx, resume=resume)
    result = {"protocol": cfg.protocol, "checkpoint": cfg.checkpoint, **result, "config": to_dict(cfg)}
    if is_main():
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        log.info("%s: top1 %.2f top5 %.2f", cfg.protocol, result["top1"], result["top5"])
    return result
