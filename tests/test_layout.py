"""The package's layout keeps the pipeline's direction: no import cycles, every module importable.

The import graph is read from the source (top-level imports and those inside functions alike), so a cycle
hidden behind a function-level import fails here even though Python would tolerate it at run time.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import protege
from protege.recipe import TEACHER_BACKENDS
from protege.teachers import BACKENDS

ROOT = Path(protege.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The protege modules ``name`` imports anywhere in its source. ``from .x import y`` counts as importing
    ``x.y`` when that is a module, else ``x``; a package's own ``__init__`` is not an edge to its children."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            if not base.startswith("protege"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                deps.add(full if full in MODULES else base)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("protege")}
    return {d for d in deps if d in MODULES and d != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert _cycles(graph) == []


def test_the_bottom_layer_imports_nothing_above_it():
    """recipe, store, signals and sources are what every stage reads; they import no stage."""
    stages = ("protege.teachers", "protege.labeling", "protege.students", "protege.training",
              "protege.evaluation", "protege.serve", "protege.export", "protege.pipeline", "protege.cli")
    for bottom in ("protege.recipe", "protege.store", "protege.signals", "protege.sources", "protege.errors"):
        above = sorted(d for d in _imports(bottom, MODULES[bottom]) if d.startswith(stages))
        assert above == [], f"{bottom} imports {above}"


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"protege.__main__"}))  # __main__ runs the CLI
def test_every_module_imports(name):
    assert importlib.import_module(name).__name__ == name


def test_recipe_and_teachers_know_the_same_backends(tiny_lm_dir):
    """The recipe's table of prefixes and kinds is what the teachers themselves declare."""
    from protege.recipe import TeacherConfig
    from protege.teachers import make_teacher

    assert set(TEACHER_BACKENDS) == set(BACKENDS)
    specs = {"hf": f"hf:{tiny_lm_dir}", "embed": "embed:all-minilm-l6-v2", "openai": "openai:gpt-4o-mini", "anthropic": "anthropic:claude-haiku-4-5"}
    for prefix, spec in specs.items():
        cfg = TeacherConfig(model=spec, label_method="hard_label" if prefix == "anthropic" else "auto")
        assert make_teacher(cfg).kind == cfg.kind == TEACHER_BACKENDS[prefix]


def test_the_recipe_knows_which_providers_score_given_tokens_as_their_teachers_declare():
    """The recipe refuses training.distill on_policy with a served teacher that cannot score the student's tokens;
    its table is what the openai: teacher of each preset declares (can_score)."""
    from protege.recipe import SCORING_PROVIDERS, TeacherConfig
    from protege.teachers import make_teacher
    from protege.teachers.presets import PRESETS

    assert {name for name, p in PRESETS.items() if p.scores} == set(SCORING_PROVIDERS)
    for name in ("openai", "vllm", "llamacpp"):
        teacher = make_teacher(TeacherConfig(model="openai:some-model", provider=name, price_input=1, price_output=1))
        assert teacher.can_score == (name in SCORING_PROVIDERS)
