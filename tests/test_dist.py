"""Distributed training on the CPU (gloo), launched with torchrun: DDP equals one process, FSDP2 equals
DDP, and a job that loses a rank mid-run resumes under `torchrun --max-restarts 1` and ends where an
uninterrupted job does, on one node and on two (two torchrun agents on this machine). Feature
extraction, the kNN monitor and `mimkit eval` share their work across processes and give what one
process computes.

This file is also the script torchrun starts (`python tests/test_dist.py JOB OUT`): every process runs
`worker(JOB, OUT)`. The jobs run once per session (module fixtures) and the tests read their outputs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
STEPS = 8  # 32 images, global batch 8: 4 steps per epoch, 2 epochs

# The pretraining recipe of the resume test: 64 CIFAR images, 2-block encoder, 1-block decoder; batch 8
# per process x 2 processes: 4 steps per epoch, 2 epochs; a checkpoint every 2 steps.
PRETRAIN = [
    "model.preset=mae_vit_tiny_cifar_patch4", "model.depth=2", "model.decoder_depth=1", "model.embed_dim=64",
    "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_num_heads=2", "model.norm_pix_loss=true",
    "data.limit=64", "data.num_workers=0", "train.batch_size=8", "train.blr=4e-3", "train.warmup_epochs=0.5",
    "train.epochs=2", "train.log_every=2", "train.ckpt_every=2", "train.vis_images=2",
    "monitor.every_epochs=1", "monitor.bank_size=41", "monitor.query_size=15",
]
RECIPE = "configs/pretrain/mae_vit_tiny_cifar10.yaml"
# `mimkit eval` under torchrun on the DDP pretraining's last checkpoint: kNN, a linear probe on cached
# features (DDP) and fine-tuning with FSDP; on the CIFAR subset's 200 first training images.
EVALS = {
    "knn": ["data.limit=200"],
    "linprobe": ["probe.augment=false", "train.epochs=2", "data.limit=200", "train.batch_size=32"],
    "finetune": ["train.epochs=1", "data.limit=64", "train.batch_size=16", "train.strategy=fsdp"],
}
LAST = f"checkpoint-{STEPS:08d}.pt"
CRASH_AT = 5  # rank 1 dies after step 5 of the first attempt; the checkpoint of step 4 is the last one


# --------------------------------------------------------------------------- what the processes run


class Indexed(torch.utils.data.Dataset):
    """32 random 16 x 16 images whose label is their index (the per-sample mask seed)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from mimkit.data import Sample

        return Sample(self.images[i], i, f"image {i}")


def per_sample_loss(module, batch, generator):
    """MAE loss with masks that depend on the sample, not on where it sits in a batch or which process
    has it; no augmentation (normalisation only)."""
    from mimkit.data import normalize

    n = (16 // 4) ** 2
    noise = torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(int(i))) for i in batch["labels"]])
    return module(normalize(batch["images"]), noise=noise).loss, {}


def fit_per_sample(out: Path, strategy: str, batch_size: int, accum_steps: int) -> dict:
    from mimkit.config import TrainConfig
    from mimkit.train.loop import fit
    from mimkit.train.optim import param_groups

    torch.manual_seed(0)
    model = build_tiny()
    t = TrainConfig(epochs=2, batch_size=batch_size, accum_steps=accum_steps, blr=8.0, warmup_epochs=0.5,
                    clip_grad=0.5, log_every=1, vis_images=0, strategy=strategy)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, t.weight_decay)]
    optimizer = torch.optim.SGD(groups, lr=t.blr, momentum=0.9)
    return fit(model, per_sample_loss, Indexed(), optimizer, t, out_dir=out, config={}, kind="test")


def write_nine_shards(out: Path) -> None:
    """The first 9 `Indexed` images as PNG files, one class folder each (labels 0-8), written as tar
    shards of 2 images to out/shards."""
    from PIL import Image

    from mimkit.data import write_shards

    for i, image in enumerate(Indexed().images[:9]):
        (out / "folder" / f"c{i}").mkdir(parents=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / "folder" / f"c{i}" / "image.png")
    write_shards(str(out / "folder"), str(out / "shards"), shard_size=2)


def nine_images(out: Path) -> dict:
    """The 9 images as a map-style dataset and as a stream of shards."""
    from mimkit.data import ShardDataset

    return {"map": torch.utils.data.Subset(Indexed(), range(9)), "stream": ShardDataset(str(out / "shards"), 16)}


def extract_in_shares(out: Path) -> None:
    """Features of 9 images (a map-style dataset and a stream of shards), 2 per batch (rank 0: 3 batches,
    rank 1: 2), from the model as it is and sharded by FSDP2; every rank saves what it got."""
    from mimkit.data import normalize
    from mimkit.eval.features import extract
    from mimkit.train.dist import rank, wrap

    torch.manual_seed(0)
    model = build_tiny()
    got = {}
    for strategy in ("plain", "fsdp"):
        if strategy == "fsdp":
            wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), "fsdp", torch.device("cpu"))
        for kind, data in nine_images(out).items():
            got[strategy, kind] = extract(model, data, normalize, pool="mean", batch_size=2)
    torch.save(got, out / f"extract-{rank()}.pt")


def worker(job: str, out: Path, cache: str, strategies: str = "ddp,fsdp") -> None:
    import torch.distributed as dist

    from mimkit import cli
    from mimkit.train.dist import process_group

    logging.basicConfig(level=logging.INFO, format="mimkit: %(message)s")
    cache = f"data.cache_dir={cache}"
    if job == "equal":  # and the uninterrupted pretraining runs the resume tests compare with
        with process_group(torch.device("cpu")):
            fit_per_sample(out / "ddp", "ddp", batch_size=2, accum_steps=2)
            fit_per_sample(out / "fsdp", "fsdp", batch_size=2, accum_steps=2)
            extract_in_shares(out)
            for strategy in ("ddp", "fsdp"):  # the command line, which adds the kNN monitor's hook
                args = [*PRETRAIN, cache, f"out_dir={out / f'full_{strategy}'}", f"train.strategy={strategy}"]
                assert cli.main(["pretrain", RECIPE, *args]) == 0
            for protocol, args in EVALS.items():
                args = [*args, cache, f"out_dir={out / f'eval_{protocol}'}"]
                assert cli.main(["eval", protocol, str(out / "full_ddp" / "checkpoints" / LAST), *args]) == 0
    elif job == "crash":
        # The command line `mimkit pretrain RECIPE ... --resume auto` with one more hook, for DDP and then
        # FSDP: attempt 0 loses rank 1 in the DDP job; attempt 1 finishes it and loses rank 1 in the FSDP
        # job; attempt 2 finds the DDP job done and finishes the FSDP one.
        from mimkit.train import loop

        attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
        real = loop.pretrain
        for dies_in, strategy in enumerate(strategies.split(",")):

            def die(info, dies_in=dies_in):
                if attempt == dies_in and info.step == CRASH_AT and dist.get_rank() == 1:
                    os._exit(17)

            loop.pretrain = lambda cfg, resume=None, hooks=(), overwrite=False, die=die: real(cfg, resume,
                                                                                               [*hooks, die], overwrite)
            args = [*PRETRAIN, cache, f"out_dir={out / strategy}", f"train.strategy={strategy}"]
            assert cli.main(["pretrain", RECIPE, *args, "--resume", "auto"]) == 0
    elif job == "exit":  # a group whose last collective ends the script, its DDP model kept past the block
        from mimkit.train.dist import gather_objects, rank, wrap

        with process_group(torch.device("cpu")):
            model = build_tiny()
            KEPT.append(wrap(model, torch.optim.AdamW(model.parameters()), "ddp", torch.device("cpu")))
            KEPT[0](torch.randn(2, 3, 16, 16)).loss.backward()
            gather_objects(rank())
    else:
        raise SystemExit(f"unknown job {job}")


KEPT = []


# --------------------------------------------------------------------------- launching


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` with the CPU and a free port; stops the test on
    failure with the processes' output."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def weights(path: Path) -> dict[str, torch.Tensor]:
    from mimkit.train import checkpoint

    return checkpoint.load(path)["model"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def losses(run: Path) -> list[float]:
    from mimkit.metrics import read_metrics

    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def equal_runs(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("equal")
    write_nine_shards(out)
    torchrun(str(HERE), "equal", str(out), cache)
    return out


def test_ddp_with_two_processes_equals_one_process_with_the_same_global_batch(equal_runs, tmp_path):
    """One process with batch 8 and two DDP processes with batch 2 x 2 accumulation micro-steps each
    (global batch 8: each step sees the same 8 images, which `ResumableSampler` deals to the ranks) end
    with the same weights after 8 steps.

    For that the two runs must draw the same augmentation and masks for an image although it sits in a
    different batch, position and process. Augmentation is off (normalisation only) and each image's
    mask comes from a generator seeded by the image's index (`per_sample_loss`); everything else is the
    real loop: sharded sampler, DDP gradient averaging, `no_sync` on accumulation micro-steps, lr
    scaled by the world size (`blr` x effective batch / 256), clipping by the global norm, the loss
    averaged over processes at log steps, unwrapped checkpoints.

    The optimizer is SGD with momentum and weight decay, not AdamW: the attention key bias has a true
    gradient of exactly zero (softmax ignores a constant added to every score of a query), so its
    computed gradient is rounding noise (~1e-10) that differs with the order of any sum; Adam divides
    that noise by its own magnitude and moves these entries by up to lr per step, in any two runs that
    differ in the last bit (measured 3e-5 after 8 steps, while all other weights agree to 1e-6). SGD
    keeps a rounding difference a rounding difference, so the comparison is exact up to float
    arithmetic (measured 6e-8), with weights that moved by up to 0.14."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes (OMP_NUM_THREADS=1); a tiny model gains nothing from 2
    try:
        fit_per_sample(tmp_path, "ddp", batch_size=8, accum_steps=1)  # one process: DDP is not used
    finally:
        torch.set_num_threads(threads)
    single = weights(tmp_path / "checkpoints" / f"checkpoint-{STEPS:08d}.pt")
    ddp = weights(equal_runs / "ddp" / "checkpoints" / f"checkpoint-{STEPS:08d}.pt")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ddp)  # saved unwrapped
    torch.manual_seed(0)
    initial = build_tiny().state_dict()
    assert max_difference(single, {k: initial[k] for k in single}) > 0.05  # training moved the weights
    assert max_difference(single, ddp) < 1e-5
    assert losses(equal_runs / "ddp") == pytest.approx(losses(tmp_path), abs=1e-5)  # averaged over ranks


def test_fsdp2_gives_the_same_weights_as_ddp(equal_runs):
    """The same two-process run with `train.strategy=fsdp` (FSDP2 `fully_shard` per block and root):
    sharded parameters, reduce-scattered gradients, sharded momentum; its sharded checkpoint (DCP),
    read back whole, holds the DDP run's weights."""
    from mimkit.train import checkpoint

    path = equal_runs / "fsdp" / "checkpoints" / f"checkpoint-{STEPS:08d}"
    assert path.is_dir() and (path / ".metadata").is_file() and (path / "state.pt").is_file()
    state = checkpoint.load(path)
    assert state["step"] == STEPS and state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    ddp = weights(equal_runs / "ddp" / "checkpoints" / f"checkpoint-{STEPS:08d}.pt")
    assert max_difference(state["model"], ddp) < 1e-5
    assert losses(equal_runs / "fsdp") == pytest.approx(losses(equal_runs / "ddp"), abs=1e-5)


def test_features_are_extracted_in_shares_and_every_rank_gets_all_of_them(equal_runs):
    """Under torchrun each process embeds its share of a dataset, map-style or a stream of shards (here
    unequal: 5 and 4 images, 3 and 2 batches; the short rank embeds an empty batch so that FSDP's weight
    gathers stay paired) and every process gets every image's features, as one process computes them."""
    from mimkit.data import normalize
    from mimkit.eval.features import extract

    torch.manual_seed(0)
    model = build_tiny()
    for kind, data in nine_images(equal_runs).items():
        alone, alone_labels = extract(model, data, normalize, pool="mean")
        alone = alone[alone_labels.argsort()]
        assert sorted(alone_labels.tolist()) == list(range(9))
        for r in range(2):
            for strategy in ("plain", "fsdp"):
                feats, labels = torch.load(equal_runs / f"extract-{r}.pt")[strategy, kind]
                assert sorted(labels.tolist()) == list(range(9)), (r, strategy, kind)  # each image once
                assert torch.allclose(feats[labels.argsort()], alone, atol=1e-5), (r, strategy, kind)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_knn_monitor_shares_its_work_and_logs_what_one_process_computes(strategy, equal_runs, tmp_path):
    """`monitor.every_epochs=1` in a two-process pretraining: kNN top-1 is logged at the end of both
    epochs and, at the last one, equals the monitor run alone on the final weights (read from the
    checkpoint, a directory of shards for FSDP, which `mimkit visualize` also reads)."""
    from mimkit import load
    from mimkit.cli import main
    from mimkit.config import load_config
    from mimkit.eval.knn import KNNMonitor
    from mimkit.metrics import read_metrics
    from mimkit.train.loop import StepInfo

    run = equal_runs / f"full_{strategy}"
    logged = [r for r in read_metrics(run / "metrics.jsonl") if "knn_top1" in r]
    assert [r["step"] for r in logged] == [STEPS // 2, STEPS]
    cfg = load_config(run / "config.yaml")
    last = run / "checkpoints" / (f"checkpoint-{STEPS:08d}" + (".pt" if strategy == "ddp" else ""))
    model = load(last)
    assert main(["visualize", str(last), "--num", "2", "--out", str(tmp_path / "recon.png")]) == 0
    assert (tmp_path / "recon.png").stat().st_size > 1000
    alone = KNNMonitor.from_config(cfg)(StepInfo(STEPS, 1, STEPS // 2, True, model))
    assert logged[-1]["knn_top1"] == pytest.approx(alone["knn_top1"], abs=1e-6)


def test_eval_under_torchrun_scores_what_one_process_scores(equal_runs, cache, tmp_path):
    """`mimkit eval` started by torchrun: the processes share feature extraction and validation, train
    through DDP or FSDP, and rank 0 writes results.json and best.pt. kNN gives the top-1 of one
    process; the fine-tuned (FSDP) best.pt, gathered whole, scores in one process what was reported."""
    import json

    from mimkit import load
    from mimkit.cli import main
    from mimkit.data import EvalTransform, build_dataset
    from mimkit.eval.context import predict

    results = {p: json.loads((equal_runs / f"eval_{p}" / "results.json").read_text()) for p in EVALS}
    ckpt = str(equal_runs / "full_ddp" / "checkpoints" / LAST)
    assert main(["eval", "knn", ckpt, *EVALS["knn"], f"data.cache_dir={cache}", f"out_dir={tmp_path}"]) == 0
    alone = json.loads((tmp_path / "results.json").read_text())
    assert results["knn"]["top1"] == pytest.approx(alone["top1"], abs=1e-6)
    assert results["knn"]["bank"] == alone["bank"] == 200 and results["knn"]["queries"] == alone["queries"]
    for protocol in ("linprobe", "finetune"):
        assert results[protocol]["steps"] == {"linprobe": 2 * 200 // 64, "finetune": 64 // 32}[protocol]
        assert (equal_runs / f"eval_{protocol}" / "best.pt").is_file()
    classifier = load(equal_runs / "eval_finetune" / "best.pt").eval()
    val = build_dataset("cifar10", "builtin", "test", img_size=32, cache_dir=cache)
    transform = EvalTransform(32, crop_pct=1.0, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    scored = predict(classifier, val, transform, 64, "cpu", torch.zeros(0, 3, 32, 32))
    assert results["finetune"]["best"]["top1"] == pytest.approx(scored["top1"], abs=1e-6)
    assert results["finetune"]["top1"] == pytest.approx(scored["top1"], abs=1e-6)  # one epoch: best = last


def _same_run(a: Path, b: Path, last: str) -> None:
    from mimkit.metrics import read_metrics
    from mimkit.train import checkpoint

    x, y = checkpoint.load(a / "checkpoints" / last), checkpoint.load(b / "checkpoints" / last)
    assert x["model"].keys() == y["model"].keys()
    assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])
    drop = lambda rs: [{k: v for k, v in r.items() if k not in ("images_per_s", "time_s")} for r in rs]  # noqa: E731
    assert drop(read_metrics(a / "metrics.jsonl")) == drop(read_metrics(b / "metrics.jsonl"))


@pytest.fixture(scope="module")
def crashed_runs(tmp_path_factory, cache) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("crashed")
    done = torchrun("--max-restarts", "2", str(HERE), "crash", str(out), cache)
    return out, done.stdout + done.stderr


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_job_that_loses_a_rank_resumes_under_torchrun_and_ends_as_an_uninterrupted_one(
        strategy, equal_runs, crashed_runs):
    """Rank 1 dies (os._exit, no clean-up) after step 5; torchrun (--max-restarts) stops rank 0 and
    starts both again; `--resume auto` finds the checkpoint of step 4 (a file for DDP, a sharded
    directory for FSDP) and the job ends with bit-for-bit the weights and metrics of an uninterrupted
    job. The interrupted jobs run the command line (`mimkit pretrain ... --resume auto`)."""
    full = equal_runs / f"full_{strategy}"
    out, log = crashed_runs
    crashed = out / strategy
    assert log.count("(exitcode: 17) local_rank: 1") == 2  # rank 1 was lost once in each job
    last = f"checkpoint-{STEPS:08d}" + (".pt" if strategy == "ddp" else "")
    assert f"resumed from {crashed / 'checkpoints' / 'checkpoint-00000004'}" in log
    assert (crashed / "pictures" / f"recon-{STEPS:08d}.png").is_file() and (crashed / "curves.png").is_file()
    _same_run(full, crashed, last)


def test_a_two_node_job_that_loses_a_node_resumes_and_ends_as_an_uninterrupted_one(equal_runs, cache, tmp_path):
    """The README's several-node command (c10d rendezvous, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
    --max-restarts) with two torchrun agents of one process each on this machine: node 1's process dies
    after step 5, both agents restart their processes, and the DDP job resumes from step 4 and ends with
    the weights and metrics of the uninterrupted one-node job."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    # one thread per process, as torchrun sets for several processes per node: the same kernels, the same bits
    env.update(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "mimkit-test",
           "--max-restarts", "1", str(HERE), "crash", str(tmp_path), cache, "ddp"]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    log = "".join(logs)
    assert log.count("(exitcode: 17) local_rank: 0") == 1  # node 1's process was lost once
    assert f"resumed from {tmp_path / 'ddp' / 'checkpoints' / 'checkpoint-00000004.pt'}" in log
    _same_run(equal_runs / "full_ddp", tmp_path / "ddp", LAST)


def test_a_job_ends_cleanly_when_its_last_collective_ends_the_script():
    """A script whose last collective is the last thing it does, the DDP model (and so gloo's threads)
    outliving the group: every process exits with 0. Before `process_group` ended on a barrier and a
    pause, a gloo thread still releasing that collective's tensors could meet the interpreter's shutdown
    and abort ("terminate called without an active exception"), in about half of such launches: a
    finished job that torchrun reports as failed (CI saw it once in the two-node test)."""
    for _ in range(4):
        torchrun(str(HERE), "exit", "-", "-", timeout=120)


def test_activation_checkpointing_recomputes_the_same_gradients():
    """`train.grad_checkpointing` (every block of encoder and decoder) changes what is stored for
    backward, not the numbers (CPU: bit for bit) nor the parameter names; and only with gradients on."""
    from mimkit.train.loop import checkpoint_blocks

    torch.manual_seed(0)
    plain = build_tiny()
    checkpointed = build_tiny()
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_blocks(checkpointed)
    checkpoint_blocks(checkpointed)  # idempotent
    imgs = torch.randn(4, 3, 16, 16)
    for model in (plain, checkpointed):
        model(imgs, generator=torch.Generator().manual_seed(1)).loss.backward()
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), checkpointed.parameters())
               if a.grad is not None)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        checkpointed(imgs, generator=torch.Generator().manual_seed(1)).loss.backward()
    with_checkpoints, saved[:] = sum(saved), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        plain(imgs, generator=torch.Generator().manual_seed(1)).loss.backward()
    assert with_checkpoints < sum(saved) / 2  # the blocks' insides are not kept


def build_tiny():
    from mimkit.models import build_model

    return build_model("mae", img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                       decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)


if __name__ == "__main__":
    worker(*sys.argv[1:2], Path(sys.argv[2]), *sys.argv[3:])
