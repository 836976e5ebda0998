"""The metrics file of a run, `metrics.jsonl`: one JSON object per line (written by `mimkit.train.log`,
drawn by `mimkit.viz`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("mimkit")


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file. A line that is not a JSON object (a crash mid-write leaves
    half a line) is skipped with a warning naming it."""
    records = []
    for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = "bad"
        if isinstance(record, dict):
            records.append(record)
        elif record is not None:
            log.warning("%s:%d: skipping a damaged line (%.60s)", path, n, line)
    return records
