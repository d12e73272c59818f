"""An embedding teacher: a sentence-embedding model scores each text against every label's prototype.

A zero-shot classifier that runs anywhere with no API key. A label's prototype is the embedding of
"name: description" (the name alone without one); with worked examples (``task.examples``, ``teacher.few_shot``)
it is the L2-normalised sum of that and the direction of the label's examples' mean embedding, weighted
n / (n + 1) for n examples (the description counts as one). With cosine similarities
s_k = cos(text, prototype_k), the distribution is p = softmax(s / teacher.score_temperature).

Pooling follows the model's sentence-transformers layout where it has one (``modules.json``, the pooling
module's ``config.json``: mean, CLS, max or last-token pooling; ``sentence_bert_config.json``'s
``max_seq_length``), else mean pooling. Embeddings are always L2-normalised (the cosine needs it; a layout's
Normalize module asks for the same). Plain transformers: no sentence-transformers dependency.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import TeacherError
from ..lean import encode, encoder_states
from ..recipe import TeacherConfig
from ..signals import LabelDistribution, TeacherSignal
from ..sources import ModelSource, resolve_source
from .base import Request
from .hf import pick_device, pick_dtype

__all__ = ["EmbeddingTeacher", "Layout", "pool_tokens", "read_layout"]

# How prototypes are made, in the identity: a change here must re-label, so bump the version with it.
# With n examples e_i of a label whose description embeds as d: normalise(d + n/(n+1) normalise(mean(e_i))).
# On the demo data (600 held-out texts, 10 draws of examples, T=0.05) it was within 0.01 NLL of the best form
# tried at every n from 1 to 16; normalise(d + mean(e_i)) was worse with one example than with none.
PROTOTYPES = "v2: normalise(embed('name: description') + n/(n+1) normalise(mean(embed(examples))))"

_POOLING_KEYS = {  # sentence-transformers' pooling config -> ours
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean",  # a rescaled mean: the same cosine
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}
_ST_MODULES = "sentence_transformers.models."


@dataclass(frozen=True)
class Layout:
    """How the model's token states become one sentence vector (a sentence-transformers directory says)."""

    pooling: Literal["mean", "cls", "max", "last"] = "mean"
    normalize: bool = False  # the layout has a Normalize module (we L2-normalise either way)
    max_seq_length: int | None = None  # the length the model was trained at, if it says
    subfolder: str = ""  # where the transformer's weights are, relative to the model directory
    sentence_transformers: bool = False  # whether the directory has a sentence-transformers layout at all


def _layout_dir(source: ModelSource, spec: str) -> Path:
    """A local directory holding the model's layout files (for a hub id: only those files, fetched)."""
    if source.local:
        return Path(source.name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.name_or_path, allow_patterns=["*.json"]))
    except (OSError, ValueError) as e:  # offline and not cached, no such repo, gated, a malformed id
        raise TeacherError(
            f"cannot read the layout of embedding model {spec!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{e}); check the id, or download the model to a directory and use embed:<directory>"
        ) from None


def read_layout(source: ModelSource, spec: str) -> Layout:
    """The model's :class:`Layout`; mean pooling and no length limit where it has no sentence-transformers files.

    Raises :class:`TeacherError` for a layout this teacher cannot follow (a Dense module, weighted-mean
    pooling, several pooling modes concatenated), rather than embedding differently from the model's own."""
    root = _layout_dir(source, spec)
    if not (root / "modules.json").is_file():
        return Layout()
    modules = json.loads((root / "modules.json").read_text())
    pooling, normalize, subfolder, max_seq_length = "mean", False, "", None
    for m in modules:
        kind = str(m.get("type", "")).removeprefix(_ST_MODULES)
        path = str(m.get("path", ""))
        if kind == "Transformer":
            subfolder = path
            st_cfg = root / path / "sentence_bert_config.json"
            if st_cfg.is_file():
                max_seq_length = json.loads(st_cfg.read_text()).get("max_seq_length")
        elif kind == "Pooling":
            cfg = json.loads((root / path / "config.json").read_text())
            on = {k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True}
            modes = {_POOLING_KEYS.get(k, k) for k in on}
            if len(modes) != 1 or not modes <= set(_POOLING_KEYS.values()):
                raise TeacherError(
                    f"embedding model {spec!r} pools with {sorted(on) or 'no mode'}; an 'embed:' teacher pools "
                    "with exactly one of mean, CLS, max or last token. Use a model that does (all-minilm-l6-v2)"
                )
            pooling = modes.pop()
        elif kind == "Normalize":
            normalize = True
        else:
            raise TeacherError(
                f"embedding model {spec!r} has a sentence-transformers {kind!r} module, which an 'embed:' teacher "
                "does not apply (it runs Transformer, Pooling and Normalize only). Use a model without one "
                "(all-minilm-l6-v2)"
            )
    return Layout(pooling, normalize, max_seq_length, subfolder, sentence_transformers=True)  # type: ignore[arg-type]


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per text from token states (B, T, H) and the attention mask (B, T)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(1).values
    if mode == "last":  # the last attended position, whichever side the tokenizer pads
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # mean over real tokens


class EmbeddingTeacher:
    """``embed:<model>``: cosine similarity of a text to each label's prototype, softmaxed at a temperature."""

    kind: Literal["local"] = "local"
    can_score = False  # not a language model
    method = "embedding"

    def __init__(self, spec: str, cfg: TeacherConfig):
        self.spec, self.cfg = spec, cfg
        root = resolve_source(spec)
        if root.gguf_file:
            raise TeacherError(
                f"'embed:{spec}' is a GGUF file; an 'embed:' teacher needs a transformers encoder directory or hub "
                "id (all-minilm-l6-v2, sentence-transformers/all-MiniLM-L6-v2)"
            )
        self.layout = read_layout(root, spec)
        sub = self.layout.subfolder
        self.source = ModelSource(str(Path(root.name_or_path) / sub), local=True) if root.local and sub else root
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.max_length = min(cfg.max_length, self.layout.max_seq_length or cfg.max_length)
        self.identity: dict[str, Any] = {
            "backend": "embed",
            "model": spec,
            "weights": self.source.fingerprint(),
            "method": self.method,
            "pooling": self.layout.pooling,
            "normalize": self.layout.normalize,
            "score_temperature": cfg.score_temperature,
            "max_length": self.max_length,
            "dtype": str(self.dtype),
            "prototypes": PROTOTYPES,
        }
        self._model: Any = None
        self._tokenizer: Any = None
        self._prototypes: dict[tuple[Any, ...], torch.Tensor] = {}

    # -- loading -------------------------------------------------------------------------------------------

    def load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        kw: dict[str, Any] = {"trust_remote_code": self.cfg.trust_remote_code}
        if self.layout.subfolder and not self.source.local:
            kw["subfolder"] = self.layout.subfolder
        try:
            config = AutoConfig.from_pretrained(self.source.name_or_path, **kw)
        except (OSError, ValueError) as e:
            raise TeacherError(f"cannot load embedding model {self.spec!r}: {e}") from None
        archs = getattr(config, "architectures", None) or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
        if getattr(config, "is_encoder_decoder", False) or (causal and not self.layout.sentence_transformers):
            raise TeacherError(
                f"'embed:{self.spec}' is a {archs[0] if archs else config.model_type} model, not a sentence-embedding "
                f"encoder; use a sentence-embedding model (embed:all-minilm-l6-v2), or hf:{self.spec} to have a "
                "causal LM score the labels"
            )
        self._tokenizer = AutoTokenizer.from_pretrained(self.source.name_or_path, **kw)
        self._model = AutoModel.from_pretrained(self.source.name_or_path, dtype=self.dtype, **kw)
        self._model.to(self.device).eval()

    @property
    def num_parameters(self) -> int:
        self.load()
        return sum(p.numel() for p in self._model.parameters())

    def model_and_tokenizer(self) -> tuple[Any, Any]:
        """The loaded encoder and tokenizer."""
        self.load()
        return self._model, self._tokenizer

    # -- embedding -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """(L2-normalised float32 embeddings (N, H), tokens of each text after truncation)."""
        self.load()
        vecs, lengths = [], []
        for i in range(0, len(texts), self.cfg.batch_size):
            enc = {k: v.to(self.device) for k, v in encode(self._tokenizer, texts[i : i + self.cfg.batch_size],
                                                            self.max_length).items()}
            hidden = encoder_states(self._model)(**enc)  # (B, T, H)
            if hidden is None:
                raise TeacherError(
                    f"embedding model {self.spec!r} returns no token states (last_hidden_state); an 'embed:' "
                    "teacher needs an encoder such as all-minilm-l6-v2"
                )
            pooled = pool_tokens(hidden, enc["attention_mask"], self.layout.pooling).float()  # (B, H)
            if not torch.isfinite(pooled).all():
                raise TeacherError(
                    f"embedding model {self.spec!r} produced NaN or infinite embeddings"
                    + (f" in {self.dtype}; set teacher.dtype: float32" if self.dtype != torch.float32 else "")
                )
            vecs.append(torch.nn.functional.normalize(pooled, dim=-1))
            lengths += [int(n) for n in enc["attention_mask"].sum(1)]
        return torch.cat(vecs), lengths

    def prototypes(self, request: Request) -> torch.Tensor:
        """Unit-norm prototypes (K, H) of the request's labels, in its label order (cached per label set)."""
        labels = request.labels
        descriptions = request.label_descriptions or ("",) * len(labels)
        key = (labels, descriptions, request.examples)
        if key in self._prototypes:
            return self._prototypes[key]
        if len(descriptions) != len(labels):
            raise TeacherError(f"a request has {len(descriptions)} label descriptions for {len(labels)} labels")
        protos, _ = self.embed([f"{n}: {d}" if d else n for n, d in zip(labels, descriptions)])  # (K, H)
        if request.examples:
            shots, _ = self.embed([t for t, _ in request.examples])  # (E, H)
            of = [lab for _, lab in request.examples]
            strange = sorted(set(of) - set(labels))
            if strange:
                raise TeacherError(f"worked examples are labelled {strange}, which are not among the labels {labels}")
            rows = []
            for k, name in enumerate(labels):
                mine = shots[[i for i, lab in enumerate(of) if lab == name]]  # (n, H), n may be 0
                n = len(mine)
                # the description counts as one example, so a single example cannot outvote it (PROTOTYPES)
                centroid = torch.nn.functional.normalize(mine.mean(0), dim=-1) if n else torch.zeros_like(protos[k])
                rows.append(protos[k] + n / (n + 1) * centroid)
            protos = torch.stack(rows)
        self._prototypes[key] = torch.nn.functional.normalize(protos, dim=-1)
        return self._prototypes[key]

    def signals(self, requests: Sequence[Request]) -> list[TeacherSignal]:
        if any(r.generate is not None for r in requests):
            raise TeacherError(f"'embed:{self.spec}' scores labels and cannot write answers (a generation request)")
        if not requests:
            return []
        vecs, lengths = self.embed([r.text for r in requests])  # (N, H)
        out = []
        for r, v, n in zip(requests, vecs, lengths):
            logits = (self.prototypes(r) @ v) / self.cfg.score_temperature  # (K,) cosines / T
            p = torch.softmax(logits.double(), -1)  # float64, so it sums to 1 within rounding
            out.append(TeacherSignal(
                distribution=LabelDistribution(r.labels, tuple(float(x) for x in p), method="embedding"),
                logits=[[float(x) for x in logits]],
                usage={"input_tokens": n},
            ))
        return out
