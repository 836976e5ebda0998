"""Experiment trackers besides metrics.jsonl (`train.trackers`): TensorBoard, Weights & Biases, MLflow.

Each one is the library made for it, configured the library's way (W&B: WANDB_PROJECT, WANDB_MODE,
WANDB_API_KEY...; MLflow: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME). Only rank 0 logs. A tracker
gets every logged scalar at its step, the resolved config and the command line once, every
reconstruction picture, and the curves at the end. The ids of a run's tracker runs are kept in
out_dir/trackers.json, so a resumed run (`--resume`) continues the same W&B run (`id` + `resume`) and
the same MLflow run (`run_id`) instead of starting new ones.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from mimkit.train.checkpoint import TrainingError

IDS = "trackers.json"


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, out_dir: Path, config: dict, run_id: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.id, self.writer = "tensorboard", SummaryWriter(str(out_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")
        self.writer.add_text("command", " ".join(sys.argv))

    def scalars(self, record: dict, step: int) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def image(self, key: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(key, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out_dir: Path, config: dict, run_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mimkit"), name=out_dir.name, dir=str(out_dir),
                              config={**config, "command": " ".join(sys.argv)},
                              id=run_id, resume="allow" if run_id else None)  # a new id from W&B, or ours
        self.id = self.run.id

    def scalars(self, record: dict, step: int) -> None:
        self.run.log(_scalars(record), step=step)

    def image(self, key: str, path: Path, step: int) -> None:
        self.run.log({key: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, out_dir: Path, config: dict, run_id: str | None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mimkit")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=out_dir.name,
                                            tags={"command": " ".join(sys.argv)}).info.run_id
            from mlflow.entities import Param

            params = [Param(key, str(value)[:6000]) for key, value in _flat(config).items()]  # MLflow's limits:
            for i in range(0, len(params), 100):  # 6000 characters a value, 100 params a batch
                self.client.log_batch(run_id, params=params[i : i + 100])
        self.id = run_id

    def scalars(self, record: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(1000 * time.time())
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in _scalars(record).items()])

    def image(self, key: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.id, str(path), artifact_path=key)

    def close(self) -> None:
        self.client.set_terminated(self.id)


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def _read_ids(path: Path) -> dict[str, str]:
    """The tracker run ids a run recorded: {tracker: id}; anything else there is a one-line error."""
    try:
        ids = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainingError(f"{path}: unreadable ({type(e).__name__}: {e}); delete it to start new tracker "
                            "runs") from None
    if not isinstance(ids, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ids.items()):
        raise TrainingError(f"{path}: not a {{tracker: run id}} object; delete it to start new tracker runs")
    return ids


def open_trackers(names, out_dir: str | Path, config: dict, resume: bool) -> list:
    """The trackers `names` for the run in `out_dir`; with `resume`, the tracker runs it logged to
    before (out_dir/trackers.json, written atomically here)."""
    out_dir = Path(out_dir)
    ids_file = out_dir / IDS
    ids = _read_ids(ids_file) if resume and ids_file.is_file() else {}
    trackers = [KINDS[name](out_dir, config, ids.get(name)) for name in names]
    tmp = ids_file.with_name(IDS + ".tmp")
    tmp.write_text(json.dumps({name: t.id for name, t in zip(names, trackers)}) + "\n")
    os.replace(tmp, ids_file)
    return trackers
