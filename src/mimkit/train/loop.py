"""The training loop, shared by every pretraining method and by the supervised evaluation protocols.

One visible order per optimizer step (nanoGPT `train.py`, torchtitan `train_step`):
schedule -> autocast forward -> non-finite bookkeeping -> backward -> unscale + clip -> step ->
zero_grad -> log -> hooks -> checkpoint. The task computes its own loss (`loss_fn`); the loop
never looks inside it. The only host syncs are at log and checkpoint steps.

Under torchrun (WORLD_SIZE > 1) the same loop runs in every process on its share of the data, through
DDP or FSDP2 (`train.strategy`, see `train/dist.py`); processes exchange gradients in backward (only
on the last accumulation micro-step), and loss statistics, the non-finite check and the time budget
at log steps. Rank 0 writes logs, metrics, pictures and checkpoints (FSDP: every process writes its
shards).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import IterableDataset

import mimkit
from mimkit.config import Config, TrainConfig
from mimkit.convert import WeightsError, load_checked
from mimkit.data import EvalTransform, PretrainAugment, build_dataset, check_skipped, make_loader, set_epoch, spread
from mimkit.models import METHODS, resolve_model_config, resolved_config
from mimkit.train import checkpoint, dist
from mimkit.train.dist import is_main, pick_device, process_group
from mimkit.train.log import MetricsLog, progress
from mimkit.train.malloc import keep_freed_memory
from mimkit.train.optim import build_adamw, cosine_lr, set_lr
from mimkit.viz import reconstruction_grid, save_png

log = logging.getLogger("mimkit")

class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and the last checkpoint is left as it was."""


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation (gradient) checkpointing per transformer block: a block keeps only its input for
    backward and recomputes its inside then (`torch.utils.checkpoint`, non-reentrant, which replays the
    RNG so that dropout and stochastic depth draw the same), trading about one more forward for the
    memory of every block's activations. In place, names unchanged; only when gradients are on."""
    from torch.utils.checkpoint import checkpoint

    for blocks in dist.block_lists(model):
        for block in blocks:
            if getattr(block, "_checkpointed", False):
                continue
            forward = block.forward

            def run(*args, _forward=forward, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
                return _forward(*args, **kwargs)

            block.forward, block._checkpointed = run, True


def compile_blocks(model: nn.Module) -> None:
    """`torch.compile` each transformer block in place (`nn.Module.compile`: parameter names keep no
    `_orig_mod.` prefix). Per block rather than the whole model: one compiled graph serves every block of
    a stack, compilation is quick, and masking (random numbers from a generator) stays eager."""
    for blocks in dist.block_lists(model):
        for block in blocks:
            block.compile()


def _reduce_logs(first_bad: torch.Tensor, loss_sum: torch.Tensor, extra_sums: dict, images: int):
    """At a log step of a process group: the mean of the loss sums (and extras) over processes, the
    images of all, and the first non-finite step of any (so that all stop together)."""
    keys = sorted(extra_sums)
    world = dist.world_size()
    count = torch.tensor(float(images), device=loss_sum.device)
    sums = dist.all_reduce(torch.stack([loss_sum, *(extra_sums[k] for k in keys), count]))
    never = torch.iinfo(torch.long).max
    first = dist.all_reduce(torch.where(first_bad < 0, never, first_bad), "min")
    first = torch.where(first == never, -1, first)
    return first, sums[0] / world, {k: sums[1 + i] / world for i, k in enumerate(keys)}, int(sums[-1].item())


@dataclass
class StepInfo:
    """What a hook sees after each optimizer step."""

    step: int
    """Optimizer steps done."""
    epoch: int
    """Epochs started (0-based epoch of the step just done)."""
    steps_per_epoch: int
    end_of_epoch: bool
    model: nn.Module
    """The unwrapped model being trained."""


Hook = Callable[[StepInfo], "dict | None"]
"""Called after every optimizer step; may return metrics to log at that step (e.g. an online kNN monitor)."""

LossFn = Callable[[nn.Module, dict, torch.Generator], "tuple[torch.Tensor, dict]"]
"""(model, batch from the loader, generator) -> (scalar loss, {name: scalar tensor} to log, e.g. the
parts of a composite loss): augmentation and forward of one task."""


def fit(model: nn.Module, loss_fn: LossFn, dataset, optimizer: torch.optim.Optimizer, t: TrainConfig, *,
        out_dir: str | Path, config: dict, kind: str, strict: bool = False, num_workers: int = 0,
        resume: str | None = None, hooks: list[Hook] = (), on_checkpoint: Callable[[int], None] | None = None,
        ) -> dict:
    """The one training loop: schedule, AMP, accumulation, clipping, logging, hooks, atomic checkpoints
    and exact resume, for any task whose loss `loss_fn` computes.

    `resume` is None, "auto" (the latest valid checkpoint in out_dir/checkpoints, if any) or a path.
    `config` and `kind` are stored in checkpoints so that `mimkit.load` can rebuild the model.
    Returns a summary: final step, last logged loss, checkpoint path, skipped files, out_dir.

    Under torchrun, every process calls `fit` with an identically initialised model and its optimizer;
    hooks and `on_checkpoint` run in every process (write files only where `is_main()`), with the
    unwrapped model (FSDP: sharded in place; its forward and `forward_features` gather the weights)."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    device = next(model.parameters()).device
    rank, world = dist.rank(), dist.world_size()
    if world > 1 and not dist.is_distributed():
        raise RuntimeError(f"WORLD_SIZE={world} but this process is in no process group: call fit inside "
                           "mimkit.train.dist.process_group(device), as pretrain does")
    sharded = world > 1 and t.strategy == "fsdp"
    loader = make_loader(dataset, t.batch_size, seed=t.seed, shuffle=True, drop_last=True, num_workers=num_workers,
                         rank=rank, world_size=world)
    steps_per_epoch = len(loader) // t.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one optimizer step needs "
                         f"(train.batch_size={t.batch_size} x train.accum_steps={t.accum_steps})")
    total_steps = t.epochs * steps_per_epoch
    last_step = min(total_steps, t.max_steps) if t.max_steps else total_steps
    effective_batch = t.batch_size * t.accum_steps * world
    base_lr = t.lr or t.blr * effective_batch / 256  # MAE's linear scaling rule
    warmup_steps = round(t.warmup_epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    # Augmentation and masks: one stream per process (rank 0's is a single process's stream). Weights
    # were initialised identically everywhere by the caller; dropout and stochastic depth draw from the
    # global generator, which each process of a group reseeds.
    generator = torch.Generator().manual_seed(t.seed + 1 + rank)
    if world > 1:
        torch.manual_seed(t.seed + 1 + rank)
    if t.keep_memory and device.type == "cpu":
        keep_freed_memory()
    if t.grad_checkpointing:
        checkpoint_blocks(model)
    if t.compile:
        compile_blocks(model)
    wrapped = dist.wrap(model, optimizer, t.strategy, device)  # forward and backward go through this

    step, skipped = 0, {}
    found = None
    if resume == "auto":  # rank 0 chooses, so that every process resumes from the same checkpoint
        found = checkpoint.load_latest(ckpt_dir) if is_main() else None
    elif resume is not None:
        found = (Path(resume), None)
    path = dist.broadcast_object(found[0] if found else None)
    if path is not None:
        state = found[1] if found and found[1] is not None and is_main() else None
        if sharded:
            if not path.is_dir():
                raise WeightsError(f"{path}: train.strategy=fsdp resumes from a sharded checkpoint directory")
            state = checkpoint.load_sharded(path, model, optimizer)
        else:
            if path.is_dir():
                raise WeightsError(f"{path}: a sharded checkpoint resumes with train.strategy=fsdp on several "
                                   "processes (or convert it: mimkit.train.checkpoint.consolidate)")
            state = state if state is not None else checkpoint.load(path)
            load_checked(model, state["model"], f"checkpoint {path}")
            optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        saved_world = state.get("world_size", 1)
        if saved_world != world:
            log.warning("checkpoint %s was written by %d process(es), this run has %d: the data order and "
                        "random streams do not continue exactly", path, saved_world, world)
        ranks = state.get("rng_ranks")
        checkpoint.set_rng_state(ranks[rank] if ranks and rank < len(ranks) else state["rng"], generator)
        step, skipped = state["step"], dict(state["skipped"])
        log.info("resumed from %s at step %d", path, step)
    elif resume == "auto":
        log.info("no checkpoint in %s; starting from scratch", ckpt_dir)

    main = is_main()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    metrics = MetricsLog(out_dir, enabled=main, resume_step=step if found else None)
    log.info("%s: %d images, %d steps/epoch, %d steps, effective batch %d, lr %.3g, device %s",
             kind, len(dataset), steps_per_epoch, last_step, effective_batch, base_lr, device)

    def save_checkpoint() -> Path | None:
        """Every process calls this: rank 0 gathers the random states (and skipped files) of all."""
        gathered = dist.gather_objects((checkpoint.rng_state(generator), skipped))
        state, path = None, None
        if main:
            for _, theirs in gathered[1:]:
                for name, reason in theirs.items():
                    skipped.setdefault(name, reason)
            state = {"scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                     "rng": gathered[0][0], "skipped": list(skipped.items()), "config": config, "method": kind,
                     "version": mimkit.__version__}
            if world > 1:
                state.update(rng_ranks=[rng for rng, _ in gathered], world_size=world, strategy=t.strategy)
        if sharded:
            path = checkpoint.save_sharded(ckpt_dir, step, state, model, optimizer, t.keep_last)
        elif main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}
            path = checkpoint.save(ckpt_dir, step, state, t.keep_last)
        if on_checkpoint is not None:
            on_checkpoint(step)
        return path

    bar = progress(last_step, step, main, desc=kind)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # step of the first non-finite loss
    loss_sum = torch.zeros((), device=device)
    extra_sums: dict[str, torch.Tensor] = {}
    images, logged_steps, last_loss, ckpt_path = 0, 0, float("nan"), None
    stand_in = None  # with several processes: the last readable micro-batch, for an unreadable one
    timer = started = time.perf_counter()
    model.train()
    while step < last_step:
        epoch, start = divmod(step, steps_per_epoch)
        set_epoch(loader, epoch, start * t.accum_steps * t.batch_size)
        batches = iter(loader)
        while step < last_step and step // steps_per_epoch == epoch:
            lr = cosine_lr(step, total_steps, warmup_steps, base_lr, t.min_lr)
            set_lr(optimizer, lr)
            for micro in range(t.accum_steps):
                batch, weight = next(batches), 1.0
                check_skipped(batch, strict, skipped)
                if batch["images"].shape[0] == 0:  # every file of this micro-batch was unreadable
                    if world == 1:
                        continue
                    # Every process must run each backward (the gradient exchange is collective): run
                    # the last good micro-batch again with weight 0.
                    if stand_in is None:
                        raise RuntimeError(f"rank {rank}: every image of the first micro-batch is unreadable")
                    batch, weight = stand_in, 0.0
                elif world > 1:
                    stand_in = batch
                images += batch["images"].shape[0] if weight else 0
                # DDP / FSDP exchange gradients in the last micro-step's backward only.
                with dist.no_sync(wrapped, t.strategy, sync=micro == t.accum_steps - 1):
                    with _autocast(device, t.precision):
                        loss, extra = loss_fn(wrapped, batch, generator)
                        loss = loss * weight / t.accum_steps
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
                    loss_sum += loss.detach().float()
                    for key, value in extra.items():  # device tensors: summed here, synced at log steps
                        extra_sums[key] = extra_sums.get(key, 0.0) + value.detach().float() * weight / t.accum_steps
                    scaler.scale(loss).backward()
            if t.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            logged_steps += 1
            bar.update(1)

            end_of_epoch = step % steps_per_epoch == 0
            over_time = bool(t.max_minutes) and time.perf_counter() - started >= 60 * t.max_minutes
            if world > 1 and t.max_minutes:  # processes must stop together: they agree at log steps
                over_time = step % t.log_every == 0 and dist.any_rank(over_time)
            if over_time:
                log.info("train.max_minutes=%g reached at step %d", t.max_minutes, step)
                last_step = step
            due_ckpt = end_of_epoch or step == last_step or (t.ckpt_every and step % t.ckpt_every == 0)
            record = {}
            if step % t.log_every == 0 or due_ckpt:
                if world > 1:
                    first_bad, loss_sum, extra_sums, images = _reduce_logs(first_bad, loss_sum, extra_sums, images)
                if first_bad.item() >= 0:
                    last = checkpoint.list_checkpoints(ckpt_dir)
                    where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
                    raise NonFiniteLossError(f"non-finite loss at step {first_bad.item() + 1}; {where}")
                now = time.perf_counter()
                last_loss = loss_sum.item() / logged_steps
                record = {"step": step, "epoch": step / steps_per_epoch, "loss": last_loss, "lr": lr,
                          "images_per_s": images / (now - timer), "skipped": len(skipped),
                          "time_s": now - started}
                record.update({k: v.item() / logged_steps for k, v in extra_sums.items()})
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.0f}")
                loss_sum.zero_()
                extra_sums.clear()
                images, logged_steps, timer = 0, 0, now
            info = StepInfo(step, epoch, steps_per_epoch, end_of_epoch, model)
            for hook in hooks:
                record.update(hook(info) or {})
            if record:
                record.setdefault("step", step)
                metrics.write(record)
            if due_ckpt:
                ckpt_path = save_checkpoint()
            if end_of_epoch and main:
                bar.write(f"epoch {epoch + 1}/{t.epochs}  step {step}  loss {last_loss:.4f}  lr {lr:.3g}")
    bar.close()
    metrics.close()
    if skipped:
        names = ", ".join(f"{p} ({r})" for p, r in skipped.items())
        log.warning("skipped %d unreadable file(s): %s", len(skipped), names)
    return {"step": step, "loss": last_loss, "checkpoint": ckpt_path, "skipped": list(skipped),
            "out_dir": str(out_dir)}


def pretrain(cfg: Config, resume: str | None = None, hooks: list[Hook] = ()) -> dict:
    """Pretrain `cfg.method` on `cfg.data` with `fit`; write checkpoints, metrics.jsonl, pictures and
    config.yaml under `cfg.out_dir`. See `fit` for `resume`, `hooks` and the summary returned.

    Started by torchrun (WORLD_SIZE > 1), every process joins the process group here and trains its
    share of each batch (`train.strategy`); `out_dir` must be on a filesystem all nodes share."""
    with process_group(pick_device(cfg.train.device)):
        return _pretrain(cfg, resume, hooks)


def _pretrain(cfg: Config, resume: str | None, hooks: list[Hook]) -> dict:
    t, d = cfg.train, cfg.data
    model_cfg = resolve_model_config(cfg.method, cfg.model)
    device = pick_device(t.device)
    torch.manual_seed(t.seed)  # weight initialisation: the same in every process
    model = METHODS[cfg.method][1](model_cfg).to(device)
    dataset = build_dataset(d.dataset, d.root, d.split, img_size=model_cfg.img_size, load_size=d.load_size,
                            strict=d.strict, cache_dir=d.cache_dir, limit=d.limit, shuffle_buffer=d.shuffle_buffer)
    augment = PretrainAugment(model_cfg.img_size, scale=d.scale, ratio=d.ratio, hflip=d.hflip, mean=d.mean,
                              std=d.std)
    # The fused kernel: one pass over all parameters; measured 3x faster than the default loop on the CPU.
    optimizer = build_adamw(model, t.blr, t.weight_decay, t.betas, fused=device.type in ("cuda", "cpu"))

    def loss_fn(module: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        out = module(augment(batch["images"].to(device, non_blocking=True), generator), generator=generator)
        return out.loss, out.logs

    vis_batch = _picture_batch(dataset, t.vis_images, model_cfg.img_size, d)

    def picture(step: int) -> None:
        # Every process is here; an FSDP model's forward needs them all, any other only rank 0's.
        sharded = dist.world_size() > 1 and t.strategy == "fsdp"
        if vis_batch is not None and (is_main() or sharded):
            grid = reconstruction_grid(model, vis_batch, d.mean, d.std, seed=t.seed)
            if is_main():
                save_png(grid, Path(cfg.out_dir) / "pictures" / f"recon-{step:08d}.png")

    return fit(model, loss_fn, dataset, optimizer, t, out_dir=cfg.out_dir, config=resolved_config(cfg),
               kind=cfg.method, strict=d.strict, num_workers=d.num_workers, resume=resume, hooks=hooks,
               on_checkpoint=picture)


def _picture_batch(dataset, n: int, img_size: int, d) -> torch.Tensor | None:
    """A fixed set of `n` readable images spread over the dataset, resized and center-cropped."""
    if n == 0:
        return None
    if isinstance(dataset, IterableDataset):  # a stream of shards: its first images
        samples = (sample.image for sample in dataset.first(2 * n))
    else:
        samples = (dataset[i][0] for i in spread(len(dataset), 2 * n))
    imgs = [image for image in samples if image is not None][:n]
    return EvalTransform(img_size, crop_pct=1.0, mean=d.mean, std=d.std)(torch.stack(imgs)) if imgs else None
