"""Experiment trackers, offline, read back with each library's own reader: MLflow on a local file
store, W&B in offline mode, TensorBoard event files; a resumed run continues the same tracker run."""

import json

import pytest

from mimkit.config import ConfigError, load_config
from mimkit.train.checkpoint import TrainingError
from mimkit.train.loop import pretrain

ARGS = ["method=mae", "model.preset=mae_vit_tiny_cifar_patch4", "model.depth=1", "model.decoder_depth=1",
        "data.limit=64", "data.num_workers=0", "train.batch_size=16", "train.epochs=2", "train.log_every=1",
        "train.ckpt_every=2", "train.vis_images=2"]


class Stop(Exception):
    pass


def _run_with_a_crash(tmp_path, tracker: str) -> None:
    """4 steps per epoch, 8 in all: stopped after step 5, resumed from the step-4 checkpoint."""
    cfg = load_config(None, [*ARGS, f"train.trackers=[{tracker}]", f"data.cache_dir={tmp_path / 'c'}",
                             f"out_dir={tmp_path / 'run'}"])

    def stop(info):
        if info.step == 5:
            raise Stop

    with pytest.raises(Stop):
        pretrain(cfg, hooks=[stop])
    assert pretrain(cfg, resume="auto")["step"] == 8


def test_mlflow_gets_every_step_the_config_pictures_and_curves_in_one_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mimkit-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store, no database
    _run_with_a_crash(tmp_path, "mlflow")
    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment_by_name("mimkit-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed run continued the first one
    run = runs[0]
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert steps == list(range(1, 9))
    assert run.data.params["train.blr"] == "0.00015" and run.data.params["model.embed_dim"] == "192"
    assert "command" in run.data.tags and run.info.status == "FINISHED"
    pictures = [f.path for f in client.list_artifacts(run.info.run_id, "pictures")]
    assert "pictures/recon-00000008.png" in pictures and "pictures/recon-00000004.png" in pictures
    assert [f.path for f in client.list_artifacts(run.info.run_id, "curves")] == ["curves/curves.png"]


def _wandb_records(path, block: int = 32768) -> list[bytes]:
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks: crc32c, length,
    type FULL/FIRST/MIDDLE/LAST) after W&B's 7-byte header. W&B 0.31 dropped its Python reader of
    these files; the records are parsed below with its own protobuf classes."""
    data, pos, out, buf = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            out.append(buf)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_history_and_resumes_the_same_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run_with_a_crash(tmp_path, "wandb")
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    ids = {path.name.rsplit("-", 1)[-1] for path in runs}
    assert len(runs) == 2 and len(ids) == 1  # two sessions, one W&B run id
    steps, pictures, config = set(), 0, None
    for path in runs:
        for data in _wandb_records(next(path.glob("run-*.wandb"))):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                if "loss" in items:
                    steps.add(int(items["_step"]))
                pictures += any(key.startswith("pictures/") for key in items)  # an image: its file's fields
            elif kind == "run":
                config = {item.key or "/".join(item.nested_key): item.value_json for item in record.run.config.update}
    assert set(range(1, 9)) <= steps and pictures >= 3
    assert json.loads(config["train"])["blr"] == 0.00015 and "command" in config


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, [*ARGS, "train.trackers=[tensorboard]", f"data.cache_dir={tmp_path / 'c'}",
                             f"out_dir={tmp_path / 'run'}"])
    pretrain(cfg)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))
    assert "pictures" in events.Tags()["images"]


def test_an_unknown_or_repeated_tracker_is_one_line():
    with pytest.raises(ConfigError, match=r"^train.trackers: 'neptune' is not one of tensorboard, wandb, mlflow$"):
        load_config(None, ["train.trackers=[neptune]"])
    with pytest.raises(ConfigError, match=r"^train.trackers: each at most once, got \['tensorboard', 'tensorboard'\]$"):
        load_config(None, ["train.trackers=[tensorboard,tensorboard]"])


def test_a_damaged_trackers_file_stops_the_resume_in_one_line(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_config(None, [*ARGS, "train.trackers=[tensorboard]", "train.epochs=1",
                             f"data.cache_dir={tmp_path / 'c'}", f"out_dir={tmp_path / 'run'}"])
    pretrain(cfg)
    (tmp_path / "run" / "trackers.json").write_text('{"tensorboard": 3')
    with pytest.raises(TrainingError, match=r"^.*trackers\.json: unreadable \(JSONDecodeError: .*\); delete it to "
                                            r"start new tracker runs$"):
        pretrain(load_config(None, [*ARGS, "train.trackers=[tensorboard]", "train.epochs=2",
                                    f"data.cache_dir={tmp_path / 'c'}", f"out_dir={tmp_path / 'run'}"]), resume="auto")
