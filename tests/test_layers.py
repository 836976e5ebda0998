"""The direction of imports (DESIGN.md): cli -> eval -> train -> models; train and eval use data;
config and serialization import nothing of mimkit. Every import statement counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mimkit"

# module prefix -> mimkit modules it may import (besides its own package and `mimkit.config`)
ALLOWED = {
    "mimkit.config": (),
    "mimkit.serialization": (),  # the one safe reader, below everything that reads files
    "mimkit.masking": (),
    "mimkit.targets": (),
    "mimkit.tokenizers": ("mimkit.serialization",),
    "mimkit.data": ("mimkit.serialization",),
    "mimkit.models": ("mimkit.masking", "mimkit.targets", "mimkit.tokenizers"),
    # weights in and out sit below training, which reads and writes checkpoints through them
    "mimkit.convert": ("mimkit.models", "mimkit.serialization"),
}
NEVER = {  # module prefix -> what it must not import
    "mimkit.train": ("mimkit.eval", "mimkit.cli"),
    "mimkit.eval": ("mimkit.cli",),
    "mimkit.viz": ("mimkit.eval", "mimkit.cli"),
}


def imports() -> dict[str, set[str]]:
    """mimkit module -> the mimkit modules its source imports."""
    found = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mimkit"):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("mimkit")}
        found[name] = targets
    return found


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_imports_follow_the_layers():
    found = imports()
    assert len(found) > 25 and "mimkit.train.loop" in found  # the scan sees the package
    wrong = []
    for module, targets in sorted(found.items()):
        for prefix, allowed in ALLOWED.items():
            if within(module, prefix):
                ok = (prefix, "mimkit.config", *allowed)
                wrong += [f"{module} imports {t}" for t in targets if not any(within(t, a) for a in ok)]
        for prefix, banned in NEVER.items():
            if within(module, prefix):
                wrong += [f"{module} imports {t}" for t in targets if any(within(t, b) for b in banned)]
        if module != "mimkit.__main__":
            wrong += [f"{module} imports {t}" for t in targets if within(t, "mimkit.cli")]
    assert wrong == []
