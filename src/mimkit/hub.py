"""The Hugging Face Hub: `hf-hub:ORG/NAME[@REVISION]` as a weights source, model cards, uploads.

Everything goes through `huggingface_hub` (its cache under HF_HOME / HF_HUB_CACHE, revisions, the
token from HF_TOKEN or `hf auth login`, HF_HUB_OFFLINE=1 for the cache alone); mimkit writes no
client of its own. `resolve` turns a source into a local snapshot folder, `model_card` writes the
README.md of an exported folder from the run it came from, `push` uploads a folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import yaml

from mimkit.metrics import read_metrics
from mimkit.serialization import WeightsError

PREFIX = "hf-hub:"


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise WeightsError("the Hugging Face Hub needs huggingface_hub: pip install 'mimkit[hub]'") from None
    return huggingface_hub


def is_hub(source: object) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def resolve(source: str) -> Path:
    """The local folder of `hf-hub:ORG/NAME[@REVISION]`: downloaded into the Hub cache, or taken from it
    (offline, or already there); a repository that cannot be had is one line."""
    repo, _, revision = source[len(PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise WeightsError(f"{source}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    hub = _hub()
    try:
        return Path(hub.snapshot_download(repo, revision=revision or None, library_name="mimkit"))
    except Exception as e:  # the library's own errors: offline and not cached, no such repository, no access
        raise WeightsError(f"{source}: cannot get it from the Hugging Face Hub ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def push(folder: str | Path, repo: str, private: bool = False) -> str:
    """Upload `folder` as the model repository `repo` (created if missing); returns its URL."""
    hub = _hub()
    api = hub.HfApi()
    url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                      commit_message="Upload from mimkit export")
    return str(url)


def _run_of(checkpoint: str | Path) -> Path | None:
    """The run folder holding `checkpoint` (runs/x for runs/x/checkpoints/checkpoint-N.pt), or None."""
    path = Path(checkpoint)
    run = path.parent.parent if path.parent.name == "checkpoints" else None
    return run if run is not None and (run / "config.yaml").is_file() else None


def _results(run: Path) -> list[tuple[str, dict]]:
    """(protocol, results) of every `results.json` under the run folder (evaluations written inside it)."""
    found = []
    for path in sorted(run.rglob("results.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(result, dict) and "top1" in result:
            found.append((str(result.get("config", {}).get("protocol", path.parent.name)), result))
    return found


def model_card(repo: str, description: str, architecture: str, checkpoint: str | Path | None = None,
               version: str = "") -> str:
    """README.md for an exported Hugging Face folder: what the model is (`description`, e.g.
    `mae ViT 768x12 ...`), how it was pretrained (the run's config.yaml and metrics.jsonl, when
    `checkpoint` sits in a mimkit run), the evaluation results found in that run, and how to load it
    with transformers, timm and mimkit. `architecture` is the transformers class of the folder."""
    run = _run_of(checkpoint) if checkpoint is not None else None
    cfg: Mapping = yaml.safe_load((run / "config.yaml").read_text()) if run else {}
    lines = ["---", "library_name: transformers", "tags: [mimkit, masked-image-modeling, vision-transformer]",
             "---", "", f"# {repo.split('/')[-1]}", "", f"A {description}, pretrained with "
             f"[mimkit](https://pypi.org/project/mimkit/){f' {version}' if version else ''}.", ""]
    if cfg:
        d, t, model = cfg.get("data", {}), cfg.get("train", {}), cfg.get("model", {})
        records = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        losses = [r for r in records if "loss" in r]
        lines += ["## Pretraining", "",
                  f"- method: `{cfg.get('method')}`, {model.get('img_size')} px, patch {model.get('patch_size')}"
                  + (f", mask ratio {model['mask_ratio']}" if "mask_ratio" in model else ""),
                  f"- data: `{d.get('dataset')}` at `{d.get('root')}` (split `{d.get('split')}`), crops scale "
                  f"{d.get('scale')}, mean {d.get('mean')}, std {d.get('std')}",
                  f"- recipe: {t.get('epochs')} epochs planned, batch {t.get('batch_size')} x accumulation "
                  f"{t.get('accum_steps')} per process, base lr {t.get('blr')}, warmup {t.get('warmup_epochs')} "
                  f"epochs, weight decay {t.get('weight_decay')}, {t.get('precision')}"
                  + (f"; started from `{cfg['init']}`" if cfg.get("init") else ""),
                  f"- trained: {losses[-1]['step']} steps, last loss {losses[-1]['loss']:.4f}" if losses
                  else "- trained: no logged steps", ""]
        results = _results(run)
        if results:
            lines += ["## Evaluation", "", "| protocol | top-1 (%) | top-5 (%) |", "|---|---:|---:|"]
            lines += [f"| {p} | {r['top1']:.2f} | {r.get('top5', float('nan')):.2f} |" for p, r in results]
            lines += [""]
    lines += ["## Use", "", "```python", f"from transformers import {architecture}",
              f'model = {architecture}.from_pretrained("{repo}")', "", "import mimkit",
              f'model = mimkit.load("hf-hub:{repo}")  # or: mimkit eval knn hf-hub:{repo}', "```", "",
              "For timm, write a timm folder from it and load that:", "", "```bash",
              f"mimkit export hf-hub:{repo} --to timm --out vit_timm",
              'python -c "import timm; timm.create_model(\'local-dir:vit_timm\', pretrained=True)"', "```", ""]
    return "\n".join(lines)
