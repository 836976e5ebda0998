"""The direction of imports (DESIGN.md): cli -> eval -> train -> models; train and eval use data;
config and serialization import nothing of mimkit. Every import statement counts, also those inside
functions, and the rules hold for everything a module imports transitively; no two modules import each
other, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mimkit"

# module prefix -> mimkit modules it may import (besides its own package and `mimkit.config`)
ALLOWED = {
    "mimkit.config": (),
    "mimkit.serialization": (),  # the one safe reader, below everything that reads files
    "mimkit.metrics": (),
    "mimkit.device": (),
    "mimkit.masking": ("mimkit.device",),
    "mimkit.targets": (),
    "mimkit.tokenizers": ("mimkit.serialization",),
    "mimkit.data": ("mimkit.serialization", "mimkit.device"),
    "mimkit.models": ("mimkit.masking", "mimkit.targets", "mimkit.tokenizers"),
    # weights in and out sit below training, which reads and writes checkpoints through them
    "mimkit.architecture": ("mimkit.models", "mimkit.serialization"),
    "mimkit.hub": ("mimkit.metrics", "mimkit.serialization"),
    "mimkit.convert": ("mimkit.architecture", "mimkit.models", "mimkit.serialization", "mimkit.hub"),
    # weights in, for a run that starts from them
    "mimkit.warmstart": ("mimkit.convert", "mimkit.architecture", "mimkit.hub"),
}
NEVER = {  # module prefix -> what it must not import
    "mimkit.train": ("mimkit.eval", "mimkit.cli"),
    "mimkit.eval": ("mimkit.cli",),
    "mimkit.viz": ("mimkit.eval", "mimkit.cli", "mimkit.train"),
}


def _name(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """mimkit module -> the mimkit modules its source imports (`from pkg import submodule` counts as
    importing the submodule)."""
    modules = {_name(path): path for path in SRC.rglob("*.py")}
    found = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mimkit"):
                targets.add(node.module)
                targets |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("mimkit")}
        found[name] = targets - {name}
    return found


def closure(found: dict[str, set[str]]) -> dict[str, set[str]]:
    """module -> every mimkit module it imports, directly or through others."""
    out = {}
    for module in found:
        seen, todo = set(), list(found[module])
        while todo:
            t = todo.pop()
            if t not in seen:
                seen.add(t)
                todo += found.get(t, ())
        out[module] = seen
    return out


def below(prefix: str) -> set[str]:
    """What `prefix` may import transitively: what it may import, and what those may."""
    out, todo = set(), list(ALLOWED[prefix])
    while todo:
        t = todo.pop()
        if t not in out:
            out.add(t)
            todo += ALLOWED.get(t, ())
    return out


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_imports_follow_the_layers():
    direct = imports()
    assert len(direct) > 25 and "mimkit.train.loop" in direct  # the scan sees the package
    assert "mimkit.eval.run" in closure(direct)["mimkit.cli"]  # through a function-local import
    found = closure(direct)
    wrong = []
    for module, targets in sorted(found.items()):
        for prefix in ALLOWED:
            if within(module, prefix):
                ok = (prefix, "mimkit.config", *below(prefix))
                wrong += [f"{module} imports {t}" for t in targets if not any(within(t, a) for a in ok)]
        for prefix, banned in NEVER.items():
            if within(module, prefix):
                wrong += [f"{module} imports {t}" for t in targets if any(within(t, b) for b in banned)]
        if module != "mimkit.__main__":
            wrong += [f"{module} imports {t}" for t in targets if within(t, "mimkit.cli")]
    assert wrong == []


def test_no_module_imports_itself_through_others():
    found = closure(imports())
    circles = sorted(m for m, targets in found.items() if m in targets)
    assert circles == []


def test_import_mimkit_and_help_load_neither_torch_nor_kornia():
    import subprocess
    import sys

    script = ("import sys, mimkit, mimkit.cli\n"
              "try:\n    mimkit.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'kornia', 'numpy')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_files_and_functions_read_in_one_sitting():
    """No file over 500 lines, no function over 80 (the training loop included): docs/design.md."""
    long = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 500:
            long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.name}: {node.name} {lines} lines")
    assert long == []
