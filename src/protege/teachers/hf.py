"""Local Hugging Face teachers: a causal LM that scores every label, or a sequence classifier.

The causal LM renders the task as a chat prompt and scores each label as the assistant's whole answer:
log P(label tokens, then end-of-turn | prompt), multi-token labels summed token by token. Ending on the
end-of-turn token makes the label events disjoint ("bill" does not also count "billing"), so the masses
add up. The prompt is run once per text; its KV cache is repeated across the labels, so K labels cost one
prompt pass plus K short continuations, not K prompt passes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ProtegeError, TeacherError
from ..lean import classifier_logits, encode
from ..recipe import TeacherConfig
from ..signals import LabelDistribution, TeacherSignal, TokenLogprobs
from ..sources import ModelSource, cache_kwarg, resolve_source
from .base import Request, ScoreRequest
from .parse import ParseError, split_rationale

__all__ = ["HFCausalLMTeacher", "HFClassifierTeacher", "make_hf_teacher", "pick_device", "pick_dtype", "token_scores"]

# Inputs that carry no content, for contextual calibration (Zhao et al., 2021, "Calibrate Before Use").
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _load_config(source: ModelSource, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source.name_or_path, trust_remote_code=trust_remote_code, **source.kwargs()
        )
    except ImportError as e:
        if source.gguf_file:
            raise ProtegeError(
                "loading a GGUF teacher needs the 'gguf' package; install it with: pip install 'protege[gguf]'"
            ) from e
        raise
    except OSError as e:
        raise ProtegeError(f"cannot load model {source.name_or_path!r}: {e}") from None


def _architectures(source: ModelSource, trust_remote_code: bool) -> list[str]:
    """The model's architectures, from a local directory's config.json when it has one: a rerun answered from the
    store then never imports transformers (seconds) just to build the teacher's cache key."""
    config = Path(source.name_or_path) / "config.json"
    if source.local and not source.gguf_file and config.is_file():
        try:
            archs = json.loads(config.read_text(encoding="utf-8")).get("architectures")
            if archs is None or isinstance(archs, list):
                return [str(a) for a in archs or []]
        except (ValueError, AttributeError):
            pass  # transformers reads it, and says what is wrong with it
    return list(getattr(_load_config(source, trust_remote_code), "architectures", None) or [])


def make_hf_teacher(spec: str, cfg: TeacherConfig) -> HFCausalLMTeacher | HFClassifierTeacher:
    source = resolve_source(spec)
    archs = _architectures(source, cfg.trust_remote_code)
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return HFClassifierTeacher(spec, source, cfg)
    return HFCausalLMTeacher(spec, source, cfg)


class _HFTeacher:
    """Shared loading; the model is loaded on the first call, so a cached run never loads it."""

    kind: Literal["local"] = "local"
    method: str
    can_score = False

    def __init__(self, spec: str, source: ModelSource, cfg: TeacherConfig):
        self.spec, self.source, self.cfg = spec, source, cfg
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.identity: dict[str, Any] = {
            "backend": "hf",
            "model": spec,
            "weights": source.fingerprint(),
            "method": self.method,
            "dtype": str(self.dtype),
            "max_length": cfg.max_length,
        }
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self, auto_cls: Any) -> None:
        if self._model is not None:
            return
        from transformers import AutoTokenizer

        kw = dict(trust_remote_code=self.cfg.trust_remote_code, **self.source.kwargs())
        self._tokenizer = AutoTokenizer.from_pretrained(self.source.name_or_path, **kw)
        self._model = auto_cls.from_pretrained(self.source.name_or_path, dtype=self.dtype, **kw)
        self._model.to(self.device).eval()

    @property
    def num_parameters(self) -> int:
        self.load()
        return sum(p.numel() for p in self._model.parameters())

    def model_and_tokenizer(self) -> tuple[Any, Any]:
        """The loaded model and tokenizer (evaluation times a local teacher as it times a student)."""
        self.load()
        return self._model, self._tokenizer

    def load(self) -> None:
        raise NotImplementedError


class HFCausalLMTeacher(_HFTeacher):
    method = "label_logprobs"
    can_score = True

    def __init__(self, spec: str, source: ModelSource, cfg: TeacherConfig):
        super().__init__(spec, source, cfg)
        self.identity["calibrate"] = cfg.calibrate
        self._label_ids: dict[tuple[str, ...], list[list[int]]] = {}
        self._content_free: dict[tuple[str, ...], torch.Tensor] = {}

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        self._load(AutoModelForCausalLM)
        tok = self._tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token

    # -- prompts -----------------------------------------------------------------------------------------

    def _render(self, messages: Sequence[dict[str, str]]) -> str:
        tok = self._tokenizer
        if tok.chat_template:
            return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        # A base model without a chat template: the turns as plain text, then an answer cue.
        return "\n\n".join(m["content"] for m in messages) + "\nAnswer: "

    def _prompt_ids(self, req: Request) -> list[int]:
        """Token ids of the rendered prompt; an over-long text is cut from its end, never the instruction."""
        tok = self._tokenizer
        ids = tok(self._render(req.messages), add_special_tokens=False)["input_ids"]
        over = len(ids) - self.cfg.max_length
        if over > 0:
            text_ids = tok(req.text, add_special_tokens=False)["input_ids"]
            if over >= len(text_ids):
                raise ProtegeError(
                    f"the task's instruction (with its worked examples, if any) alone is longer than "
                    f"teacher.max_length={self.cfg.max_length} tokens; raise teacher.max_length, shorten the "
                    "instruction, or show fewer examples (task.examples, teacher.few_shot)"
                )
            cut = tok.decode(text_ids[: len(text_ids) - over - 4], skip_special_tokens=True)
            messages = [{**m, "content": m["content"].replace(req.text, cut)} for m in req.messages]
            ids = tok(self._render(messages), add_special_tokens=False)["input_ids"][-self.cfg.max_length :]
        return ids

    def _label_token_ids(self, labels: tuple[str, ...]) -> list[list[int]]:
        """Tokens of each label as the answer, then the end-of-turn token.

        Tokenized after a real prompt and split at the prompt's end, so a label is tokenized as it would be
        generated there (a leading-space variant where the template leaves a space, for instance).
        """
        if labels in self._label_ids:
            return self._label_ids[labels]
        tok = self._tokenizer
        probe = self._render([{"role": "user", "content": "x"}])
        base = tok(probe, add_special_tokens=False)["input_ids"]
        out = []
        for label in labels:
            joint = tok(probe + label, add_special_tokens=False)["input_ids"]
            ids = joint[len(base) :] if joint[: len(base)] == base else tok(label, add_special_tokens=False)["input_ids"]
            if tok.eos_token_id is not None:
                ids = ids + [tok.eos_token_id]
            out.append(ids)
        if len({tuple(x) for x in out}) < len(out):
            raise ProtegeError(f"two labels tokenize to the same tokens for this teacher: {list(labels)}; rename them")
        self._label_ids[labels] = out
        return out

    # -- scoring -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _label_logprobs(self, prompts: list[list[int]], labels: tuple[str, ...]) -> torch.Tensor:
        """log P(label_k as the whole answer | prompt_b), shape (B, K), float32."""
        model, dev = self._model, self.device
        pad = self._tokenizer.pad_token_id
        label_ids = self._label_token_ids(labels)
        B, K = len(prompts), len(labels)
        T = max(map(len, prompts))
        # Left-pad so every prompt ends at the same column and continuations line up.
        ids = torch.full((B, T), pad, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p) :] = torch.tensor(p)
            mask[i, T - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True, logits_to_keep=1
        )
        first = torch.log_softmax(out.logits[:, -1].float(), -1)  # (B, V)
        lp = torch.stack([first[:, ids_k[0]] for ids_k in label_ids], 1)  # (B, K)

        L = max(map(len, label_ids)) - 1  # tokens still to score after the first
        if L == 0:
            return lp
        # Continuations: feed label tokens [0, L) for every (prompt, label) pair on the repeated cache.
        cont = torch.full((K, L), pad, dtype=torch.long)
        cmask = torch.zeros((K, L), dtype=torch.long)
        for k, ids_k in enumerate(label_ids):
            cont[k, : len(ids_k) - 1] = torch.tensor(ids_k[:-1])
            cmask[k, : len(ids_k) - 1] = 1
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.batch_repeat_interleave(K)
        full_mask = torch.cat([mask.repeat_interleave(K, 0), cmask.repeat(B, 1)], 1)  # (B*K, T+L)
        cpos = mask.sum(-1, keepdim=True).repeat_interleave(K, 0) + torch.arange(L)  # (B*K, L)
        out2 = model(
            input_ids=cont.repeat(B, 1).to(dev),
            attention_mask=full_mask.to(dev),
            position_ids=cpos.to(dev),
            use_cache=False,
            **{cache_kwarg(model): cache},
        )
        logp = torch.log_softmax(out2.logits.float(), -1).view(B, K, L, -1)  # (B, K, L, V)
        for k, ids_k in enumerate(label_ids):
            nxt = torch.tensor(ids_k[1:], device=logp.device)  # tokens predicted at steps 0..len-2
            lp[:, k] += logp[:, k, torch.arange(len(nxt)), nxt].sum(-1)
        return lp

    def _content_free_probs(self, req: Request) -> torch.Tensor:
        """Mean label distribution on content-free texts, the teacher's prior bias (Zhao et al., 2021)."""
        if req.labels not in self._content_free:
            prompts = []
            for text in CONTENT_FREE_INPUTS:
                messages = [{**m, "content": m["content"].replace(req.text, text)} for m in req.messages]
                prompts.append(self._tokenizer(self._render(messages), add_special_tokens=False)["input_ids"])
            p = torch.softmax(self._label_logprobs(prompts, req.labels), -1).mean(0)
            self._content_free[req.labels] = p
        return self._content_free[req.labels]

    @torch.inference_mode()
    def _generate(self, batch: Sequence[Request]) -> list[TeacherSignal]:
        """Greedy answers with the top-k log-probabilities (temperature 1, the model's own distribution) of
        every generated token, as token strings and as ids; generation stops at the end-of-turn token."""
        gen = batch[0].generate
        assert gen is not None
        if any(r.generate != gen for r in batch):
            raise ProtegeError("one batch of requests mixes generation settings; label one task at a time")
        model, tok, dev = self._model, self._tokenizer, self.device
        prompts = [self._prompt_ids(r) for r in batch]
        T = max(map(len, prompts))
        ids = torch.full((len(batch), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, so every answer starts at column T
            ids[i, T - len(p) :] = torch.tensor(p)
            mask[i, T - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=gen.max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=model.generation_config.eos_token_id or tok.eos_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        new = out.sequences[:, T:].cpu()  # (B, L)
        logprobs = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).cpu()  # (B, L, V)
        if not torch.isfinite(logprobs.max(-1).values).all():
            raise TeacherError(f"teacher {self.spec!r} produced NaN log-probabilities; try teacher.dtype: float32")
        stops = set(_as_list(model.generation_config.eos_token_id)) | set(_as_list(tok.eos_token_id))
        k = gen.top_logprobs
        signals = []
        for b in range(len(batch)):
            seq = new[b].tolist()
            n = next((i for i, t in enumerate(seq) if t in stops), len(seq))  # the answer, without the stop token
            seq = seq[:n]
            text = tok.decode(seq, skip_special_tokens=True)
            answer, rationale = text.strip(), None
            if gen.rationale:
                try:
                    rationale, answer, _ = split_rationale(text)
                    rationale = rationale or None
                except ParseError:
                    answer = None  # kept as text; the report counts answers without an 'Answer:' line
            # greedy: each chosen token is its position's likeliest, so scoring the reply is its top-k
            token_lp = token_scores(logprobs[b, :n], seq, k, tok, f"hf:{self.spec}") if k and seq else None
            signals.append(
                TeacherSignal(
                    text=text,
                    answer=answer,
                    rationale=rationale,
                    token_logprobs=token_lp,
                    truncated=n == len(new[b]) and n >= gen.max_tokens,
                    usage={"input_tokens": len(prompts[b]), "output_tokens": n},
                )
            )
        return signals

    @torch.inference_mode()
    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        """log p(ids[i] | ids[:i]) at every position i >= start of each request, with the top alternatives and
        the tail (see :meth:`protege.teachers.base.ApiTeacher.score`); one sequence per forward pass (no
        padding), logits of the scored positions only."""
        self.load()
        out = []
        for r in requests:
            ids = torch.tensor([r.ids], device=self.device)  # (1, T)
            logits = self._model(input_ids=ids, use_cache=False, logits_to_keep=len(r.ids) - r.start + 1).logits
            lp = torch.log_softmax(logits[0, :-1].float(), -1).cpu()  # (L, V): predicts ids[start:]
            if not torch.isfinite(lp.max(-1).values).all():
                raise TeacherError(f"teacher {self.spec!r} produced NaN log-probabilities; try teacher.dtype: float32")
            out.append(token_scores(lp, r.ids[r.start :], r.top_logprobs, self._tokenizer, f"hf:{self.spec}"))
        return out

    def signals(self, requests: Sequence[Request]) -> list[TeacherSignal]:
        self.load()
        out: list[TeacherSignal] = []
        for i in range(0, len(requests), self.cfg.batch_size):
            batch = requests[i : i + self.cfg.batch_size]
            if batch[0].generate is not None:
                out += self._generate(batch)
                continue
            labels = batch[0].labels
            if any(r.labels != labels for r in batch):
                raise ProtegeError("one batch of requests mixes label sets; label one task at a time")
            prompts = [self._prompt_ids(r) for r in batch]
            lp = self._label_logprobs(prompts, labels)  # (B, K)
            if not torch.isfinite(lp).all():
                raise TeacherError(
                    f"teacher {self.spec!r} produced NaN or infinite log-probabilities; try teacher.dtype: float32"
                )
            covered = lp.exp().sum(-1)  # (B,) mass the LM put on any label at all
            raw = torch.softmax(lp, -1)
            probs = raw
            if self.cfg.calibrate:
                probs = raw / self._content_free_probs(batch[0])
                probs = probs / probs.sum(-1, keepdim=True)
            for b, r in enumerate(batch):
                out.append(
                    TeacherSignal(
                        distribution=LabelDistribution(
                            labels=labels,
                            probs=_as_probs(probs[b]),
                            method="label_logprobs",
                            covered_mass=min(1.0, float(covered[b])),
                            calibrated=self.cfg.calibrate,
                            raw_probs=_as_probs(raw[b]) if self.cfg.calibrate else None,
                        ),
                        usage={"input_tokens": len(prompts[b])},
                    )
                )
        return out


def token_scores(lp: torch.Tensor, given: Sequence[int], k: int, tokenizer: Any, name: str) -> TokenLogprobs:
    """TokenLogprobs of the ``given`` tokens from full log-probabilities ``lp`` (L, V): per position the k
    likeliest ids and the given one (appended when it is not among them), the rest as the tail."""
    given_t = torch.tensor(list(given))  # (L,)
    top_v, top_i = lp.topk(min(k, lp.shape[-1]), -1)  # (L, k); k = 0 gives empty rows
    ids_rows, lp_rows, dicts, tails = [], [], [], []
    for row, (vals, idx, g) in enumerate(zip(top_v.tolist(), top_i.tolist(), given_t.tolist())):
        if g not in idx:
            vals, idx = vals + [float(lp[row, g])], idx + [g]
        d: dict[str, float] = {tokenizer.decode([g]): float(lp[row, g])}  # the given token's string is its own
        for v, i in zip(vals, idx):
            d.setdefault(tokenizer.decode([i]), v)  # several ids may decode alike; the likelier is kept
        ids_rows.append(tuple(idx))
        lp_rows.append(tuple(vals))
        dicts.append(d)
        tails.append(max(0.0, 1.0 - float(torch.tensor(vals, dtype=torch.float64).exp().sum())))
    return TokenLogprobs(
        tokens=tuple(tokenizer.decode([g]) for g in given), top=tuple(dicts), tail_mass=tuple(tails),
        tokenizer=name, temperature=1.0, ids=tuple(given), top_ids=tuple(ids_rows), top_logprobs=tuple(lp_rows),
    )


def _as_list(x: Any) -> list[int]:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _as_probs(p: torch.Tensor) -> tuple[float, ...]:
    """float64 renormalisation, so the stored distribution sums to 1 to within float rounding."""
    p = p.double()
    return tuple(float(x) for x in (p / p.sum()))


class HFClassifierTeacher(_HFTeacher):
    """A sequence classifier whose own logits are the signal; its label names must match the task's."""

    method = "logits"

    def load(self) -> None:
        from transformers import AutoModelForSequenceClassification

        self._load(AutoModelForSequenceClassification)

    def _order(self, labels: tuple[str, ...]) -> list[int]:
        id2label = {int(i): str(n) for i, n in self._model.config.id2label.items()}
        by_name = {n.casefold(): i for i, n in id2label.items()}
        missing = [x for x in labels if x.casefold() not in by_name]
        if missing or len(id2label) != len(labels):
            raise ProtegeError(
                f"teacher {self.spec!r} predicts labels {list(id2label.values())} but the task has {list(labels)}; "
                "name task.labels as the classifier does"
            )
        return [by_name[x.casefold()] for x in labels]

    @torch.inference_mode()
    def signals(self, requests: Sequence[Request]) -> list[TeacherSignal]:
        self.load()
        out: list[TeacherSignal] = []
        for i in range(0, len(requests), self.cfg.batch_size):
            batch = requests[i : i + self.cfg.batch_size]
            order = self._order(batch[0].labels)
            enc = {k: v.to(self.device) for k, v in encode(self._tokenizer, [r.text for r in batch],
                                                            self.cfg.max_length).items()}
            logits = classifier_logits(self._model)(**enc).float()[:, order]  # (B, K) in task label order
            if not torch.isfinite(logits).all():
                raise TeacherError(f"teacher {self.spec!r} produced NaN or infinite logits")
            probs = torch.softmax(logits, -1)
            for b, r in enumerate(batch):
                out.append(
                    TeacherSignal(
                        distribution=LabelDistribution(r.labels, _as_probs(probs[b]), method="logits"),
                        logits=[[float(x) for x in logits[b]]],
                        usage={"input_tokens": int(enc["attention_mask"][b].sum())},
                    )
                )
        return out
