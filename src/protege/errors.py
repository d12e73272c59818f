"""Errors a user can act on. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations

__all__ = [
    "ProtegeError",
    "RecipeError",
    "DataError",
    "TeacherError",
    "PermanentError",
    "BudgetReached",
    "MissingExtra",
]


class ProtegeError(Exception):
    """Bad input or a state the user must fix; the message names what is wrong and the fix."""

    exit_code = 2


class RecipeError(ProtegeError):
    """The recipe (YAML, Python objects or CLI flags) is invalid."""


class DataError(ProtegeError):
    """A data file is missing, empty, malformed or disagrees with the task."""


class TeacherError(ProtegeError):
    """A teacher returned something unusable (NaN, a distribution that does not sum to 1, ...)."""


class PermanentError(TeacherError):
    """An API refused a request in a way a retry cannot fix (bad request, key, permission, model), or cannot
    give the signal asked for. The run stops at once; everything answered so far is kept."""


class BudgetReached(ProtegeError):
    """The next call's worst-case cost would pass ``teacher.budget_usd``. Everything answered so far is
    kept: rerun with a higher cap to continue. Exit code 3, so scripts can tell it from bad input."""

    exit_code = 3


class MissingExtra(ProtegeError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'protege[{extra}]'"
        )
