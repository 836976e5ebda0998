"""Run logging: a JSONL metrics file, TensorBoard when installed, and a progress bar."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from tqdm.auto import tqdm

from mimkit.metrics import read_metrics

log = logging.getLogger("mimkit")


class MetricsLog:
    """Appends one JSON object per record to `metrics.jsonl` (and to TensorBoard if available)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Records written after the checkpoint we resume from belong to a run that crashed (the last
            # one maybe half-written); drop them so the file reads as one uninterrupted run.
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the `tensorboard` extra is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress(total: int, initial: int, enabled: bool, desc: str) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                mininterval=1.0, unit="step")
