"""mimkit: masked image modeling (MAE, CAE) pretraining of Vision Transformers in pure PyTorch."""

from mimkit.convert import load, load_weights
from mimkit.eval.features import features
from mimkit.models import build_model

__version__ = "0.1.0"
__all__ = ["build_model", "load", "load_weights", "features", "__version__"]
