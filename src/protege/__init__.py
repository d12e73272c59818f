"""protege: turn any teacher model into a small student model you own, and prove what it kept and saves."""

from .active import label
from .errors import BudgetReached, DataError, PermanentError, ProtegeError, RecipeError, TeacherError
from .evaluation import evaluate
from .labeling.labeler import estimate
from .pipeline import run, train
from .recipe import Recipe, load_recipe
from .signals import LabelDistribution, TeacherSignal, TokenLogprobs
from .store import Store
from .training.losses import distillation_loss, forward_kl

__all__ = [
    "Recipe",
    "load_recipe",
    "label",
    "estimate",
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
    "PermanentError",
    "BudgetReached",
]
__version__ = "0.1.0"
