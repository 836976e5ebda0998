"""Run logging: a JSONL metrics file, the experiment trackers a run names, and a progress bar."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from mimkit.metrics import read_metrics

log = logging.getLogger("mimkit")


class MetricsLog:
    """Appends one JSON object per record to `metrics.jsonl`, and sends it to the experiment trackers
    `trackers` (`train.trackers`, see `mimkit.train.trackers`) with the resolved `config`."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 trackers=(), config: dict | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled, self.trackers, self.step = enabled, [], 0
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Records written after the checkpoint we resume from belong to a run that crashed (the last
            # one maybe half-written); drop them so the file reads as one uninterrupted run.
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if trackers:
            from mimkit.train.trackers import open_trackers

            self.trackers = open_trackers(list(trackers), self.path.parent, config or {}, bool(resume_step))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.step = record.get("step", self.step)
        for tracker in self.trackers:
            tracker.scalars(record, self.step)

    def image(self, key: str, path: str | Path | None, step: int) -> None:
        """Send the picture at `path` (if any) to the trackers."""
        if self.enabled and path is not None:
            for tracker in self.trackers:
                tracker.image(key, Path(path), step)

    def close(self) -> None:
        """Send the curves (curves.png) to the trackers and close them."""
        if self.trackers and self.path.is_file():
            from mimkit.viz import plot_run

            self.image("curves", plot_run(self.path.parent), self.step)
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def progress(total: int, initial: int, enabled: bool, desc: str) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                mininterval=1.0, unit="step")
