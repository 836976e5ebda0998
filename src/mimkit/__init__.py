"""mimkit: masked image modeling (MAE, CAE) pretraining of Vision Transformers in pure PyTorch.

The public API is loaded on first use (PEP 562), so that `import mimkit` and the CLI's `--help` stay
cheap and a submodule importing `mimkit.__version__` pulls in nothing else."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_API = {"build_model": "mimkit.models", "load": "mimkit.convert", "load_weights": "mimkit.convert",
        "features": "mimkit.eval.features"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mimkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
