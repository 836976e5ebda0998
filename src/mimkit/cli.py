"""`mimkit` command line: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mimkit.config import Config, ConfigError, DataConfig, TrainConfig, field_docs, load_config

EPILOG = """overrides: any config field as section.key=value (values are YAML), e.g.
  train.epochs=2 train.batch_size=32 model.norm_pix_loss=true data.root=path/to/images
sections: method, model (preset + MAEConfig fields), data, train, out_dir. `mimkit pretrain --help-config` lists them."""


def config_reference() -> list[tuple[str, str]]:
    """(dotted key, meaning) for every config field, the model fields of every method included."""
    from mimkit.models import METHODS

    rows = [(name, doc) for name, doc in field_docs(Config).items() if name not in ("data", "train")]
    rows += [(f"data.{name}", doc) for name, doc in field_docs(DataConfig).items()]
    rows += [(f"train.{name}", doc) for name, doc in field_docs(TrainConfig).items()]
    for method, (cfg_cls, _, presets) in METHODS.items():
        docs = field_docs(cfg_cls)
        rows.append((f"model.preset ({method})", f"{docs.pop('preset')} One of {', '.join(presets)}."))
        rows += [(f"model.{name} ({method})", doc) for name, doc in docs.items()]
    return rows


def cmd_pretrain(args: argparse.Namespace) -> None:
    from mimkit.models import resolved_config
    from mimkit.train.loop import pretrain

    if args.help_config:
        print("\n".join(f"  {key}: {doc}" for key, doc in config_reference()))
        return
    if args.config is None:
        raise ConfigError("pretrain needs a config file, e.g. configs/pretrain/mae_vit_tiny_cifar10.yaml")
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(resolved_config(cfg), sort_keys=False), end="")
        return
    summary = pretrain(cfg, resume=args.resume)
    print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, checkpoint {summary['checkpoint']}, "
          f"outputs in {summary['out_dir']}")


def cmd_visualize(args: argparse.Namespace) -> None:
    import torch

    from mimkit.config import from_dict, to_dict
    from mimkit.convert import load, read_file
    from mimkit.data import EvalTransform, build_dataset
    from mimkit.viz import save_reconstruction

    model = load(args.checkpoint)
    d = from_dict(DataConfig, read_file(args.checkpoint)["config"]["data"], prefix="data.")
    data = to_dict(d) | {k: v for k, v in (("root", args.data), ("dataset", args.dataset), ("split", args.split))
                         if v is not None}
    d = from_dict(DataConfig, data, prefix="data.")
    dataset = build_dataset(d.dataset, d.root, d.split, img_size=model.img_size, load_size=d.load_size,
                            strict=False, cache_dir=d.cache_dir, limit=0)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(dataset), generator=g)[: args.num * 2].tolist()
    imgs = [x for x in (dataset[i][0] for i in idx) if x is not None][: args.num]
    batch = EvalTransform(model.img_size, crop_pct=1.0, mean=d.mean, std=d.std)(torch.stack(imgs))
    out = args.out or str(Path(args.checkpoint).with_suffix(".png"))
    print(save_reconstruction(model, batch, out, d.mean, d.std, seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimkit", description="Masked image modeling pretraining of ViTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a model from a YAML recipe", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/pretrain/mae_vit_tiny_cifar10.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", default=None,
                   help="'auto' resumes from the latest valid checkpoint in out_dir (if any); or a checkpoint path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its meaning")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("visualize", help="write a reconstruction picture for a checkpoint")
    p.add_argument("checkpoint", help="a mimkit checkpoint (.pt)")
    p.add_argument("--data", default=None, help="images to show: a folder or CIFAR source (default: the training data)")
    p.add_argument("--dataset", default=None, choices=["cifar10", "folder"], help="kind of --data")
    p.add_argument("--split", default=None, choices=["train", "test"], help="split to draw from")
    p.add_argument("--num", type=int, default=8, help="number of images (rows)")
    p.add_argument("--seed", type=int, default=0, help="chooses the images and the masks")
    p.add_argument("--out", default=None, help="PNG path (default: beside the checkpoint)")
    p.set_defaults(func=cmd_visualize)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mimkit.convert import WeightsError
    from mimkit.data import BadImageError
    from mimkit.train.loop import NonFiniteLossError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="mimkit: %(message)s")
    try:
        args.func(args)
    except (ConfigError, WeightsError, BadImageError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"mimkit: error: {e}", file=sys.stderr)
        return 2
    return 0
