"""protege: turn any teacher model into a small student model you own, and prove what it kept and saves."""

from .errors import DataError, ProtegeError, RecipeError, TeacherError
from .evaluate import evaluate
from .label import label
from .losses import distillation_loss, forward_kl
from .pipeline import run, train
from .recipe import Recipe, load_recipe
from .signals import LabelDistribution, TeacherSignal, TokenLogprobs
from .store import Store

__all__ = [
    "Recipe",
    "load_recipe",
    "label",
    "train",
    "evaluate",
    "run",
    "Store",
    "TeacherSignal",
    "LabelDistribution",
    "TokenLogprobs",
    "forward_kl",
    "distillation_loss",
    "ProtegeError",
    "RecipeError",
    "DataError",
    "TeacherError",
]
__version__ = "0.1.0"
