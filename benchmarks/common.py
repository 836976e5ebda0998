"""What every benchmark script shares: a description of the machine and writing the JSON report."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9B14", "Intel(R) Xeon(R) ..."), or the architecture if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The facts a reader needs to compare figures across runs."""
    return {"machine": f"{cpu_model()}, {torch.get_num_threads()} threads", "torch": torch.__version__}


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
