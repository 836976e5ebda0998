"""The README's promises: its two set-up commands, and a config reference that lists every key."""

import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

from mimkit.cli import config_reference
from mimkit.eval.config import EvalConfig
from mimkit.models import METHODS

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_second():
    first_block = README.index("```")
    assert README[first_block:].startswith("```bash\n" + BLOCKS[0]) and len(BLOCKS[0].strip().splitlines()) == 1
    assert README.index(BLOCKS[1]) < README.index("## ")  # both before the first section
    ci = (ROOT / ".ci" / "run").read_text()
    assert BLOCKS[1].strip() in ci.splitlines()


def test_demo_command_runs(tmp_path):
    demo = BLOCKS[0].strip().split("&&")[-1].strip()
    args = shlex.split(demo)
    assert args[:2] == ["mimkit", "pretrain"]
    # the demo itself, cut to 3 steps and moved to a temporary folder
    args = [a for a in args[2:] if not a.startswith("out_dir=")]
    cmd = [sys.executable, "-m", "mimkit", "pretrain", *args, "train.max_steps=3", f"out_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "checkpoint-00000003.pt").is_file()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= 1
    assert (tmp_path / "pictures" / "recon-00000003.png").is_file()


def test_config_reference_lists_every_key():
    table = README[README.index("| key | meaning |"):]
    missing = [key for key, _ in config_reference() if f"`{key}`" not in table]
    assert not missing, f"README config table lacks {missing}"
    evaluation = README[README.index("## Evaluation"):]
    missing = [key for key, _ in config_reference(EvalConfig) if not key.startswith(("data.", "train."))
               and f"`{key}`" not in evaluation]
    assert not missing, f"README evaluation table lacks {missing}"


def test_config_reference_documents_every_model_field_including_the_shared_encoder_ones():
    rows = dict(config_reference())
    for method, (cfg_cls, _, _) in METHODS.items():
        undocumented = [f.name for f in dataclasses.fields(cfg_cls) if not rows.get(f"model.{f.name} ({method})")]
        assert not undocumented, f"{method}: {undocumented}"
    assert rows["model.depth (cae)"] == rows["model.depth (mae)"] == "Encoder blocks."
