"""`mimkit` command line: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from mimkit.config import Config, ConfigError, DataConfig, check_run, field_docs, load_config

EPILOG = """overrides: any config field as section.key=value (values are YAML), e.g.
  train.epochs=2 train.batch_size=32 model.norm_pix_loss=true data.root=path/to/images
sections: method, model (preset + the method's fields), data, train, out_dir;
`mimkit pretrain --help-config` lists every key."""


def config_reference(root: type = Config) -> list[tuple[str, str]]:
    """(dotted key, meaning) for every field of `Config` (with every method's model fields) or `EvalConfig`."""
    from mimkit.models import METHODS

    sections = {name: cls for name, cls in typing.get_type_hints(root).items() if dataclasses.is_dataclass(cls)}
    rows = [(name, doc) for name, doc in field_docs(root).items() if name not in sections]
    for section, cls in sections.items():
        rows += [(f"{section}.{name}", doc) for name, doc in field_docs(cls).items()]
    if root is Config:
        for method, (cfg_cls, _, presets) in METHODS.items():
            docs = field_docs(cfg_cls)
            rows.append((f"model.preset ({method})", f"{docs.pop('preset')} One of {', '.join(presets)}."))
            rows += [(f"model.{name} ({method})", doc) for name, doc in docs.items()]
    return rows


def _print_reference(root: type) -> None:
    print("\n".join(f"  {key}: {doc}" for key, doc in config_reference(root)))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from mimkit.models import resolved_config
    from mimkit.train.loop import pretrain
    from mimkit.viz import plot_run

    if args.help_config:
        _print_reference(Config)
        return
    if args.config is None:
        raise ConfigError("pretrain needs a config file, e.g. configs/pretrain/mae_vit_tiny_cifar10.yaml")
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        check_run(cfg)
        print(yaml.safe_dump(resolved_config(cfg), sort_keys=False), end="")
        return
    hooks = []
    if cfg.monitor.every_epochs:
        from mimkit.eval.knn import KNNMonitor

        hooks.append(KNNMonitor.from_config(cfg))
    summary = pretrain(cfg, resume=args.resume, hooks=hooks, overwrite=args.overwrite)
    from mimkit.train.dist import is_main

    if is_main():  # under torchrun every process gets here; one writes
        plot_run(summary["out_dir"])
        print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, checkpoint {summary['checkpoint']}, "
              f"outputs in {summary['out_dir']}")


def cmd_eval(args: argparse.Namespace) -> None:
    from mimkit.convert import load, read_weights
    from mimkit.eval.config import EvalConfig, load_eval_config
    from mimkit.eval.run import evaluate
    from mimkit.viz import plot_run

    if args.help_config:
        _print_reference(EvalConfig)
        return
    if args.checkpoint is None:
        raise ConfigError(f"eval {args.protocol} needs a checkpoint: mimkit eval {args.protocol} CHECKPOINT")
    weights = read_weights(args.checkpoint)  # any source mimkit.load reads, read once
    # Unless told otherwise, evaluate on the pretraining data source with its normalisation.
    trained = weights.data
    source = ("dataset", "root", "image_column", "label_column", "streaming", "mean", "std", "cache_dir")
    base = {"data": {k: trained[k] for k in source if k in trained}}
    given = {"checkpoint": args.checkpoint, **({"data": {"root": args.data}} if args.data is not None else {})}
    cfg = load_eval_config(args.protocol, args.config, args.overrides, base=base, given=given)
    result = evaluate(cfg, resume=args.resume, model=load(weights), overwrite=args.overwrite)
    from mimkit.train.dist import is_main

    if not is_main():  # under torchrun every process gets here; one writes
        return
    if cfg.protocol != "knn":
        plot_run(cfg.out_dir)
    print(f"{cfg.protocol}: top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  ({cfg.out_dir}/results.json)")


def cmd_plot(args: argparse.Namespace) -> None:
    from mimkit.viz import plot_run

    print(plot_run(args.run_dir))


def cmd_visualize(args: argparse.Namespace) -> None:
    import torch

    from mimkit.config import from_dict
    from mimkit.convert import load, read_weights
    from mimkit.data import EvalTransform, dataset_of
    from mimkit.viz import save_reconstruction

    weights = read_weights(args.checkpoint)  # read once: the weights and the data settings they were trained on
    model = load(weights)
    given = {k: v for k, v in (("root", args.data), ("dataset", args.dataset), ("split", args.split)) if v is not None}
    d = from_dict(DataConfig, weights.data | given, prefix="data.")
    dataset = dataset_of(d, model.img_size, limit=0, strict=False, channels=model.in_chans)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(dataset), generator=g)[: args.num * 2].tolist()
    imgs = [x for x in (dataset[i][0] for i in idx) if x is not None][: args.num]
    batch = EvalTransform(model.img_size, crop_pct=1.0, mean=d.mean, std=d.std)(torch.stack(imgs))
    out = args.out or str(Path(args.checkpoint).with_suffix(".png"))
    print(save_reconstruction(model, batch, out, d.mean, d.std, seed=args.seed, bands=d.rgb_bands))


WEIGHTS_EPILOG = """sources: a mimkit checkpoint or converted file; an official MAE checkpoint (mae_pretrain_vit_*.pth,
mae_visualize_vit_*.pth, mae_finetuned_vit_*.pth); a Hugging Face directory (config.json + model.safetensors
or pytorch_model.bin) of ViTMAEForPreTraining, ViTMAEModel, ViTModel or ViTForImageClassification; a timm
ViT state dict (.pth, .bin, .safetensors). The architecture is read from the file; only the number of
attention heads of a non-standard width needs --num-heads."""


EXPORT_DESCRIPTION = """Load weights (any supported format) and write them for another library:
  timm         the encoder as a timm VisionTransformer state dict (.pth, or .safetensors by suffix);
               head.* only for a classifier, never a decoder; --out without a suffix: a folder for
               timm.create_model("local-dir:PATH", pretrained=True)
  official     {'model': state} as the official MAE checkpoints (decoder included), plus the architecture
  hf           a directory transformers loads with from_pretrained: ViTMAEForPreTraining with a decoder,
               ViTForImageClassification with a classifier, else ViTModel (add_pooling_layer=False)
  safetensors  all weights, with the architecture in the header (mimkit.load rebuilds the model)
  onnx         the encoder's features (--pool cls, mean or tokens) as an ONNX graph, dynamic batch
               (needs pip install 'mimkit[onnx]')"""


def _size(text: str) -> int | tuple[int, int]:
    """`224` or `224x320` (height x width) from the command line."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a side nor HEIGHTxWIDTH in pixels")
    return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def _add_weight_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=_size, default=None, metavar="PX",
                   help="resample the position embeddings (bicubic) to this resolution in pixels: a side, or "
                        "HEIGHTxWIDTH")
    p.add_argument("--num-heads", type=int, default=None, metavar="N",
                   help="encoder attention heads, for widths outside 192/384/768/1024/1280")
    p.add_argument("--decoder-num-heads", type=int, default=None, metavar="N",
                   help="MAE decoder attention heads, for decoder widths other than 512")
    p.add_argument("--encoder-only", action="store_true", help="drop the decoder, keep the encoder")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def _load_for_writing(args: argparse.Namespace):
    """(model, the data section of the run that trained it: {} for other files)."""
    from mimkit.architecture import encoder_of
    from mimkit.convert import load, read_weights

    overrides = {k: v for k, v in (("img_size", args.img_size), ("num_heads", args.num_heads),
                                   ("decoder_num_heads", args.decoder_num_heads)) if v is not None}
    weights = read_weights(args.source)
    model = load(weights, **overrides)
    return (encoder_of(model) if args.encoder_only else model), weights.data


def cmd_convert(args: argparse.Namespace) -> None:
    from mimkit.architecture import architecture_of, describe
    from mimkit.export import export

    model, _ = _load_for_writing(args)
    to = "safetensors" if Path(args.out).suffix == ".safetensors" else "official"
    out = export(model, args.out, to, overwrite=args.overwrite)
    print(f"wrote {out}: {describe(*architecture_of(model))}")


def cmd_export(args: argparse.Namespace) -> None:
    from mimkit.architecture import architecture_of, describe, encoder_of
    from mimkit.config import IMAGENET_MEAN, IMAGENET_STD
    from mimkit.export import export

    if args.push_to_hub and args.to != "hf":
        raise ConfigError(f"--push-to-hub uploads a Hugging Face folder: use it with --to hf, not --to {args.to}")
    model, data = _load_for_writing(args)
    if args.to == "timm":
        model = encoder_of(model)
    card = None
    if args.to == "hf":
        from mimkit import __version__
        from mimkit.export import hf_architecture
        from mimkit.hub import model_card

        repo = args.push_to_hub or f"your-name/{Path(args.out).name}"
        card = model_card(repo, describe(*architecture_of(model)), hf_architecture(model), args.source, __version__)
    out = export(model, args.out, args.to, overwrite=args.overwrite, pool=args.pool,
                 mean=data.get("mean", IMAGENET_MEAN), std=data.get("std", IMAGENET_STD), card=card)
    print(f"wrote {out} ({args.to}): {describe(*architecture_of(model))}")
    if args.push_to_hub:
        from mimkit.hub import push

        print(f"uploaded {out} to {push(out, args.push_to_hub, private=args.private)}")


def cmd_data_shard(args: argparse.Namespace) -> None:
    from mimkit.data.shards import write_shards

    index = write_shards(args.folder, args.out, shard_size=args.shard_size, seed=args.seed, max_side=args.max_side,
                         quality=args.quality)
    print(f"wrote {index['num_samples']} images of {len(index['classes'])} class(es) as {len(index['shards'])} "
          f"shard(s) in {args.out} (index.json lists them); train with data.dataset=shards data.root={args.out}")


def cmd_data_stats(args: argparse.Namespace) -> None:
    from mimkit.data.stats import channel_stats

    stats = channel_stats(args.folder, args.channels, args.limit)
    for path, reason in stats["skipped"][:5]:
        print(f"skipped {path}: {reason}")
    print(f"{stats['images']} images, {stats['pixels']} pixels per channel, {len(stats['skipped'])} skipped")
    print(f"data.mean={json.dumps(stats['mean'])} data.std={json.dumps(stats['std'])}")


def _add_data_parser(sub) -> None:
    """`mimkit data shard` and `mimkit data stats`."""
    p = sub.add_parser("data", help="prepare data: `mimkit data shard FOLDER OUT` writes WebDataset tar shards; "
                       "`mimkit data stats FOLDER` prints data.mean and data.std")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    stats = data_sub.add_parser("stats", help="per-channel mean and std of an image folder (data.mean, data.std)",
                                description="Mean and std of every channel over every pixel of FOLDER's images and "
                                ".npy arrays, on the 0..1 scale of their type (8-bit: x / 255, 16-bit: x / 65535, "
                                "float: as stored): the values data.mean and data.std take.")
    stats.add_argument("folder", metavar="FOLDER", help="an image folder (class sub-folders, or files directly in it)")
    stats.add_argument("--channels", type=int, default=3, metavar="N", help="channels of the images: model.in_chans "
                       "(default 3)")
    stats.add_argument("--limit", type=int, default=0, metavar="N", help="only N files spread over the folder "
                       "(default 0: all)")
    stats.set_defaults(func=cmd_data_stats)
    p = data_sub.add_parser("shard", help="write an image folder as WebDataset tar shards plus index.json",
                            description="Write the images of FOLDER (class sub-folders, or images directly in it) as "
                            "OUT/shard-000000.tar, ... (members NNNNNN.jpg/.png + NNNNNN.cls, the file bytes "
                            "unchanged, in a shuffled order) and OUT/index.json (classes and sample counts). "
                            "With --max-side N, images larger than N on their longer side are resized to N and "
                            "stored as JPEG.")
    p.add_argument("folder", metavar="FOLDER", help="an image folder, e.g. /datasets/imagenet/train")
    p.add_argument("out", metavar="OUT", help="output folder, e.g. /data/in1k-shards/train")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order in which images are written")
    p.add_argument("--max-side", type=int, default=0, metavar="N",
                   help="resize images whose longer side exceeds N to N, stored as JPEG (512 suits 224-px "
                   "pretraining; default 0: every file as it is)")
    p.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality of resized images (default 90)")
    p.set_defaults(func=cmd_data_shard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimkit", description="Masked image modeling pretraining of ViTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a model from a YAML recipe", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/pretrain/mae_vit_tiny_cifar10.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", default=None,
                   help="'auto' resumes from the latest valid checkpoint in out_dir (if any); or a checkpoint path")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an out_dir that holds another run, deleting its checkpoints and logs")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its meaning")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("visualize", help="write a reconstruction picture for a checkpoint")
    p.add_argument("checkpoint", help="a mimkit checkpoint (a file, or FSDP's directory) or other MAE weights "
                   "with an encoder and a decoder (then --data)")
    p.add_argument("--data", default=None, help="images to show: a folder or CIFAR source (default: the training data)")
    p.add_argument("--dataset", default=None, choices=["cifar10", "folder"], help="kind of --data")
    p.add_argument("--split", default=None, choices=["train", "test"], help="split to draw from")
    p.add_argument("--num", type=int, default=8, help="number of images (rows)")
    p.add_argument("--seed", type=int, default=0, help="chooses the images and the masks")
    p.add_argument("--out", default=None, help="PNG path (default: beside the checkpoint)")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("convert", help="read official MAE, Hugging Face or timm weights into a mimkit file",
                       description="Read weights in any supported format and write a mimkit file that "
                       "mimkit.load rebuilds\nthe model from, alone.", epilog=WEIGHTS_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC", help="weights file or Hugging Face directory (see below)")
    p.add_argument("out", metavar="OUT", help="OUT.safetensors (weights + architecture in the header) or OUT.pt/.pth "
                   "(torch.save {model, method, config}, the official MAE layout)")
    _add_weight_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write weights for timm, official MAE code, transformers, ONNX or safetensors",
                       description=EXPORT_DESCRIPTION, epilog=WEIGHTS_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="CKPT", help="weights file or Hugging Face directory (see below)")
    p.add_argument("--to", required=True, choices=["timm", "official", "hf", "safetensors", "onnx"],
                   help="target format")
    p.add_argument("--out", required=True, help="output file (a directory for --to hf, and for --to timm without a "
                   "file suffix)")
    p.add_argument("--pool", default="cls", choices=["cls", "mean", "tokens"],
                   help="--to onnx: the features the graph outputs (default cls)")
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                   help="--to hf: upload the folder (with its model card) to this Hugging Face Hub repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    _add_weight_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="evaluate a checkpoint: knn, linprobe, attnprobe or finetune",
                       epilog="overrides: section.key=value, e.g. train.epochs=10 probe.pool=mean "
                              "data.dataset=folder; `mimkit eval knn --help-config` lists every key")
    p.add_argument("protocol", choices=["knn", "linprobe", "attnprobe", "finetune"])
    p.add_argument("checkpoint", nargs="?", help="a mimkit checkpoint (or any weights mimkit.load reads)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--data", default=None, help="labelled data (data.root): a folder, CIFAR-10 source or 'builtin'")
    p.add_argument("--config", default=None, help="YAML recipe, e.g. configs/eval/linear_cifar10.yaml")
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint path (supervised protocols)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an out_dir that holds another run")
    p.add_argument("--help-config", action="store_true", help="list every evaluation config key")
    p.set_defaults(func=cmd_eval)

    _add_data_parser(sub)

    p = sub.add_parser("plot", help="draw loss, lr and accuracy curves of a run from its metrics.jsonl")
    p.add_argument("run_dir", help="a pretraining or evaluation output folder")
    p.set_defaults(func=cmd_plot)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; `section.key=value` overrides may also follow options (e.g. after
    `--resume PATH`), which argparse alone rejects."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    return args


def anticipated_errors() -> tuple[type[BaseException], ...]:
    """What bad input, bad configuration or the environment raises: `main` reports them in one line.
    Anything else is a bug and keeps its traceback."""
    from mimkit.data import BadImageError, DataError
    from mimkit.serialization import WeightsError
    from mimkit.train.checkpoint import TrainingError

    return ConfigError, WeightsError, BadImageError, DataError, TrainingError, OSError


def _one_line(e: BaseException) -> str:
    text = str(e) if not isinstance(e, OSError) or e.filename is None else f"{e.filename}: {e.strerror or e}"
    return " ".join(text.split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="mimkit: %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("mimkit: interrupted", file=sys.stderr)
        return 130
    except anticipated_errors() as e:
        print(f"mimkit: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0
