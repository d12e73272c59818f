"""Train a causal LM student on teacher generations, on Hugging Face Accelerate.

One function, top to bottom: build the student (and, for 'logits', load the teacher), tokenize once
(chat template, loss on the answer tokens only), then optimizer steps of: the step's rows, split into
gradient_accumulation_steps x processes micro-batches -> forward -> loss sum -> backward, all divided once by
the target-token count of the whole step (every micro-batch, every process) -> optimizer step. Checkpoints
every K steps resume to the same result. The same code runs on a CPU, a GPU, or under ``accelerate launch``.

Modes (training.distill):

- ``sequence``: cross-entropy on the teacher's text.
- ``logits``: (1 - alpha) CE + alpha tau^2 D(teacher || student) against the local 'hf:' teacher's full
  distribution (same tokenizer), through the chunked LM-head loss.
- ``topk``: the same mix against the teacher's stored top-k log-probs plus a tail bucket. A teacher with the
  student's tokenizer is used by id; otherwise its token strings are mapped onto the student's vocabulary
  and positions align only where the student's tokenization of the text reproduces the teacher's tokens.
  Positions without teacher information (and the end token) have no KD term: (1 - alpha) CE alone.
- ``on_policy``: GKD (training/on_policy.py). On a share ``on_policy_fraction`` of the steps the student samples
  a reply to each prompt and learns tau^2 D(teacher || student) on its own tokens against the local 'hf:'
  teacher (same tokenizer), reverse KL by default; the other steps are ``logits`` steps on the teacher's replies.
  A served teacher (an ``openai:`` one whose server scores given tokens, vLLM or llama.cpp) scores the samples
  through the store and the engine (``labeling/scoring.py``): the same divergence on its top-k plus the sampled
  token plus a tail bucket, and the other steps are ``topk`` steps on its stored top-k.

``training.batch_size`` counts examples per optimizer step over all processes, so a recipe gives the same
objective on one process or on many. Under FSDP (``accelerate launch --config_file examples/accelerate/fsdp_lm.yaml``)
the frozen teacher is sharded over the processes too (``_shard_teacher``), not copied onto each.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._io import atomic_dir, write_text_atomic
from ..errors import ProtegeError
from ..recipe import Recipe
from ..signals import TokenLogprobs
from ..students.card import StudentCard
from ..students.chat import ANSWER_PREFIX, EXPLAIN_PREFIX, ChatFormat, prompt_ids
from ..students.classifier import count_parameters
from ..students.lm import build_lm_student, lm_head, load_causal_lm, save_lm_student
from ..students.model_card import write_model_card
from .losses import check_vocab, chunked_lm_distillation_loss, topk_distillation_loss
from .on_policy import sample_replies, sample_seed, sampled_step
from .optim import make_optimizer
from .steps import check_split, checkpoint_dir, fingerprint, micro_batches, resume, save_checkpoint
from .tracking import end_tracking, flush_trackers, log_step, start_tracking, tracker_settings

__all__ = ["LMRow", "train_lm", "prompt_ids", "ANSWER_PREFIX", "EXPLAIN_PREFIX", "MIN_ALIGNED_SHARE"]

MIN_ALIGNED_SHARE = 0.5  # under this share of teacher positions usable, token-level KD from top-k is refused
MAX_UNMAPPED_MASS = 0.5  # ... or when more teacher probability than this falls outside the student's vocabulary


@dataclass(frozen=True)
class LMRow:
    """A training example for a causal LM student.

    ``messages``: the prompt as the teacher saw it; ``target``: the text the student learns (the teacher's
    whole reply); ``answer`` and ``rationale``: its parts, for rationale_weight > 0; ``token_logprobs``: the
    teacher's top-k for the tokens of ``target`` (distill 'topk'); ``truncated``: the teacher's reply was cut
    at its length limit, so no end-of-sequence token follows ``target`` (the student must not learn to stop
    where the teacher was stopped).
    """

    messages: tuple[dict[str, str], ...]
    target: str
    answer: str | None = None
    rationale: str | None = None
    token_logprobs: TokenLogprobs | None = None
    truncated: bool = False


# -- tokenizing once ----------------------------------------------------------------------------------------


@dataclass
class _Example:
    ids: list[int]  # prompt then target tokens (then EOS, unless the teacher was cut off)
    n_prompt: int
    weight: float
    kd_ids: list[list[int]]  # per target token: the teacher's alternatives as student ids ([] = none, CE only)
    kd_lps: list[list[float]]


class _TopK:
    """Turns a teacher's TokenLogprobs into per-token student ids and log-probs, and counts what aligned."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        n = len(tokenizer)
        self.pieces = tokenizer.batch_decode([[i] for i in range(n)])  # every student id as text
        self.by_piece: dict[str, int] = {}
        for i, s in enumerate(self.pieces):
            if "\ufffd" not in s:  # a partial UTF-8 byte stands for many things; never map onto it
                self.by_piece.setdefault(s, i)
        self.positions = self.aligned = 0
        self.mass = self.unmapped = 0.0
        self.by_id_rows = self.by_string_rows = 0

    def same_vocab(self, tl: TokenLogprobs) -> bool:
        """The teacher's ids mean the student's tokens: every id decodes to the teacher's string for it."""
        if tl.ids is None or tl.top_ids is None or tl.top_logprobs is None:
            return False
        n = len(self.pieces)
        if any(not 0 <= i < n or self.pieces[i] != s for i, s in zip(tl.ids, tl.tokens)):
            return False
        return all(
            0 <= i < n and self.pieces[i] in top for ids, top in zip(tl.top_ids, tl.top) for i in ids if i >= 0
        )

    def targets(self, text: str, ids: list[int], tl: TokenLogprobs | None, by_id: bool) -> tuple[list, list]:
        """Per token of ``ids`` (the student's tokens of ``text``): teacher alternatives as student ids and
        their log-probs, or [] where the position does not align."""
        out_ids: list[list[int]] = [[] for _ in ids]
        out_lps: list[list[float]] = [[] for _ in ids]
        self.positions += len(ids)
        if tl is None or not ids:
            return out_ids, out_lps
        if by_id and tl.ids is not None and list(ids) == list(tl.ids):
            # the student trains on the teacher's very tokens: position i is the teacher's position i, whatever
            # the token strings spell (a word-level tokenizer's pieces, for one, do not join back to the text)
            for i in range(len(ids)):
                pairs = [(a, b) for a, b in zip(tl.top_ids[i], tl.top_logprobs[i]) if a >= 0]
                self.aligned += 1
                self.mass += sum(math.exp(b) for _, b in pairs)
                out_ids[i], out_lps[i] = [a for a, _ in pairs], [b for _, b in pairs]
            return out_ids, out_lps
        teacher_text = "".join(tl.tokens)
        off = teacher_text.find(text)
        if off < 0:
            off = 0  # pieces need not join to the text exactly (a character split over tokens); each span is checked
        elif teacher_text[:off].strip():
            return out_ids, out_lps  # the text follows other teacher text (an answer after its rationale)
        starts: dict[tuple[int, int], int] = {}
        pos = 0
        for j, s in enumerate(tl.tokens):
            starts[(pos, pos + len(s))] = j
            pos += len(s)
        ends = list(itertools.accumulate(len(self.pieces[i]) for i in ids))
        if "".join(self.pieces[i] for i in ids) != text:
            # the pieces do not spell the text one by one (a character split over tokens, a tokenizer that drops
            # a leading space): decode every prefix, which is slower but exact
            ends = [len(self.tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
        prev = 0
        for i, end in enumerate(ends):
            j = starts.get((prev + off, end + off))
            piece, prev = text[prev:end], end
            if j is None or tl.tokens[j] != piece:
                continue
            self.aligned += 1
            if by_id:
                pairs = [(a, b) for a, b in zip(tl.top_ids[j], tl.top_logprobs[j]) if a >= 0]
            else:
                pairs = []
                for s, lp in tl.top[j].items():
                    sid = self.by_piece.get(s)
                    self.mass += math.exp(lp)
                    if sid is None:
                        self.unmapped += math.exp(lp)  # goes to the tail bucket
                    else:
                        pairs.append((sid, lp))
            if by_id:
                self.mass += sum(math.exp(b) for _, b in pairs)
            out_ids[i] = [a for a, _ in pairs]
            out_lps[i] = [b for _, b in pairs]
        return out_ids, out_lps

    def figures(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "aligned_share": self.aligned / self.positions if self.positions else 0.0,
            "unmapped_mass": self.unmapped / self.mass if self.mass else 0.0,
            "rows_by_id": self.by_id_rows,
            "rows_by_string": self.by_string_rows,
        }


def _encode(recipe: Recipe, rows: list[LMRow], tokenizer: Any) -> tuple[list[_Example], dict[str, Any]]:
    """Examples with the loss on target tokens only; prompts cut from their start to fit student.max_length."""
    cfg, max_len = recipe.training, recipe.student.max_length
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ProtegeError("the student's tokenizer has no end-of-sequence token; set one (tokenizer.eos_token)")
    topk = _TopK(tokenizer) if cfg.distill == "topk" or (_served(recipe) and not _all_sampled(cfg)) else None
    if topk is not None:
        for r in rows:
            if r.token_logprobs is not None and r.token_logprobs.temperature != 1.0:
                raise ProtegeError(
                    f"stored top-k logprobs describe temperature {r.token_logprobs.temperature}, but training "
                    "re-tempers from the teacher's own distribution (1.0); relabel with logprobs at temperature 1"
                )
    examples: list[_Example] = []
    too_long = cut = 0
    for r in rows:
        tl = r.token_logprobs
        by_id = topk is not None and tl is not None and topk.same_vocab(tl)
        if topk is not None and tl is not None:
            topk.by_id_rows += by_id
            topk.by_string_rows += not by_id
        if cfg.rationale_weight > 0:
            parts = [(ANSWER_PREFIX, r.answer if r.answer is not None else r.target, 1.0)]
            if r.rationale:
                parts.append((EXPLAIN_PREFIX, r.rationale, cfg.rationale_weight))
        else:
            parts = [("", r.target, 1.0)]
        for prefix, text, weight in parts:
            if by_id and text == r.target:
                target = list(tl.ids)  # the teacher's very tokens, not a re-tokenization of its text
            else:
                target = tokenizer(text, add_special_tokens=False)["input_ids"]
            kd_ids, kd_lps = topk.targets(text, target, tl, by_id) if topk is not None else ([], [])
            ends = not (r.truncated and text == r.target)  # a reply cut at the limit has no end to learn
            target = target + [eos] if ends else target
            room = max_len - len(target)  # tokens left for the prompt (at least one predicts the first target)
            if room < 1:
                too_long += 1
                continue
            p = prompt_ids(tokenizer, r.messages, prefix)  # the prefix (if any) before the last user turn
            if len(p) > room:
                p, cut = p[len(p) - room :], cut + 1
            if topk is not None and ends:
                kd_ids, kd_lps = kd_ids + [[]], kd_lps + [[]]  # the end token: cross-entropy only
            examples.append(_Example(p + target, len(p), weight, kd_ids, kd_lps))
    stats: dict[str, Any] = {"rows": len(rows), "train_examples": len(examples), "rows_too_long": too_long, "prompts_cut": cut}
    if not examples:
        raise ProtegeError(
            f"no training example fits student.max_length={max_len} tokens (every target with its end token is "
            "longer); raise student.max_length"
        )
    if topk is not None:
        fig = stats["topk"] = topk.figures()
        if fig["aligned_share"] < MIN_ALIGNED_SHARE or fig["unmapped_mass"] > MAX_UNMAPPED_MASS:
            raise ProtegeError(
                f"token-level distillation from the stored top-k is not meaningful for this student: "
                f"{fig['aligned_share']:.0%} of the {fig['positions']} answer tokens line up with the teacher's "
                f"tokens (need {MIN_ALIGNED_SHARE:.0%}) and {fig['unmapped_mass']:.0%} of the teacher's top-k "
                f"probability names no single student token (allowed {MAX_UNMAPPED_MASS:.0%}). The tokenizers "
                "differ too much; use training.distill: sequence, or a student with the teacher's tokenizer"
            )
    return examples, stats


def _collate(examples: list[_Example], pad: int, with_kd: bool) -> dict[str, torch.Tensor]:
    """Right-padded ids; ``select`` marks the positions whose next token is a target, in target order."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    select = torch.zeros((len(examples), T), dtype=torch.bool)
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        mask[b, : len(e.ids)] = 1
        select[b, e.n_prompt - 1 : len(e.ids) - 1] = True
    batch = {
        "input_ids": ids,  # (B, T)
        "attention_mask": mask,  # (B, T)
        "select": select,  # (B, T)
        "targets": torch.tensor([t for e in examples for t in e.ids[e.n_prompt :]]),  # (M,)
        "weights": torch.tensor([e.weight for e in examples for _ in e.ids[e.n_prompt :]]),  # (M,)
    }
    if with_kd:
        # an example without teacher targets (a served on-policy run's filler for an empty shard) has none per token
        rows = [pair for e in examples for pair in zip(e.kd_ids or [[]] * (len(e.ids) - e.n_prompt),
                                                         e.kd_lps or [[]] * (len(e.ids) - e.n_prompt))]
        K = max(1, max(len(i) for i, _ in rows))
        batch["kd_ids"] = torch.tensor([i + [-1] * (K - len(i)) for i, _ in rows])  # (M, K), -1 pads
        batch["kd_lps"] = torch.tensor([l + [0.0] * (K - len(l)) for _, l in rows])  # (M, K)
        batch["kd_ok"] = torch.tensor([len(i) > 0 for i, _ in rows])  # (M,)
    return batch


# -- the loss, inside one module so DDP/FSDP see all of it in forward ----------------------------------------


def _ce_chunk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    ce = F.cross_entropy(F.linear(h, w, b).float(), y, reduction="sum")  # logits (c, V) live only in here
    return ce, ce, torch.zeros_like(ce)


def _topk_chunk(
    h, w, b, y, ids, lps, ok, *, alpha: float, tau: float, divergence: str = "forward_kl", beta: float = 0.5
) -> tuple[torch.Tensor, ...]:
    z = F.linear(h, w, b)  # (c, V)
    loss, _, parts = topk_distillation_loss(
        z, ids, lps, y, ok, alpha=alpha, temperature=tau, divergence=divergence, beta=beta
    )
    # positions without the teacher's top-k have no KD term: (1 - alpha) CE alone, as the mix gives them
    ce_rest = F.cross_entropy(z[~ok].float(), y[~ok], reduction="sum")
    return loss + (1.0 - alpha) * ce_rest, parts["ce"] + ce_rest, parts["kd"]


class _StudentLoss(torch.nn.Module):
    """The student and its loss: forward returns (loss sum, CE sum, KD sum) over the batch's target tokens."""

    def __init__(self, model: Any, recipe: Recipe):
        super().__init__()
        self.model = model
        t = recipe.training
        self.mode, self.alpha, self.tau = t.distill, t.alpha, t.temperature
        self.divergence, self.beta, self.chunk = t.divergence, t.jsd_beta, t.loss_chunk_size
        # the blocks Accelerate's FSDP wraps one by one (it reads them off the module it prepares, which is this one)
        self._no_split_modules = getattr(self.base(), "_no_split_modules", None)

    def base(self) -> Any:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(
        self, batch: dict[str, torch.Tensor], teacher: tuple | None = None, sampled: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """``sampled``: the targets are the student's own samples (on-policy): the divergence alone, no CE."""
        base = self.base()
        out = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        h = out.last_hidden_state[batch["select"]]  # (M, H): the positions that predict a target token
        w, b = lm_head(base)
        weights = batch["weights"]
        total = ce = kd = h.new_zeros((), dtype=torch.float32)
        for wt in weights.unique().tolist():  # one group unless rationale examples carry their own weight
            rows = None if bool((weights == wt).all()) else weights == wt
            s, c, k = self._loss(rows, h, w, b, batch, teacher, sampled)
            total, ce, kd = total + wt * s, ce + wt * c, kd + wt * k
        return total, ce.detach(), kd.detach()

    def _loss(self, rows, h, w, b, batch, teacher, sampled=False) -> tuple[torch.Tensor, ...]:
        """(loss, CE, KD) sums over the target positions ``rows`` (a bool mask; None: all of them)."""

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x if rows is None else x[rows]

        h, y = pick(h), pick(batch["targets"])
        if self.mode in ("logits", "on_policy") and teacher is not None:  # the local teacher's full distribution
            th, tw, tb = teacher
            # on the student's own samples, alpha = 1: cross-entropy with what it sampled would only sharpen it
            loss, _, parts = chunked_lm_distillation_loss(
                h, w, pick(th), tw, y, alpha=1.0 if sampled else self.alpha, temperature=self.tau,
                divergence=self.divergence, beta=self.beta, chunk_size=self.chunk, student_bias=b, teacher_bias=tb,
            )
            return loss, torch.zeros_like(parts["ce"]) if sampled else parts["ce"], parts["kd"]
        if self.mode == "topk" or self.mode == "on_policy" and teacher is None:  # stored or served top-k
            on = dict(alpha=1.0, divergence=self.divergence, beta=self.beta) if sampled else dict(alpha=self.alpha)
            fn = functools.partial(_topk_chunk, tau=self.tau, **on)
            cols = (y, pick(batch["kd_ids"]), pick(batch["kd_lps"]), pick(batch["kd_ok"]))
        else:
            fn, cols = _ce_chunk, (y,)
        sums = [h.new_zeros((), dtype=torch.float32) for _ in range(3)]
        for start in range(0, h.shape[0], self.chunk):
            chunk = slice(start, start + self.chunk)
            # recomputed in backward, so one chunk's (c, V) logits are the most ever held
            part = torch.utils.checkpoint.checkpoint(fn, h[chunk], w, b, *(c[chunk] for c in cols), use_reentrant=False)
            sums = [a + p for a, p in zip(sums, part)]
        return sums[0], torch.zeros_like(sums[1]) if sampled else sums[1], sums[2]


# -- a teacher sharded like the student (FSDP) ---------------------------------------------------------------


class _TeacherHidden(torch.nn.Module):
    """The local teacher's last hidden states at the positions that predict a target token. One module, so that
    FSDP, which gathers a module's parameters around its forward, sees the whole teacher forward."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        out = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state[select]  # (M, Ht)


def _shard_teacher(model: Any, mesh: Any = None) -> _TeacherHidden:
    """The frozen teacher sharded over the processes with FSDP2 (``fully_shard``): each decoder block one unit,
    gathered for its forward and freed after it; the embeddings, final norm and LM head the root unit, which the
    loop gathers for a whole micro-batch (the chunked loss reads the head in forward and again in backward) and
    frees after it (``unshard`` / ``reshard``). Each process holds about 1/P of the teacher between uses."""
    from torch.distributed.fsdp import fully_shard

    hidden = _TeacherHidden(model)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(hidden, mesh=mesh)
    return hidden


def _check_fsdp(accelerator: Any, recipe: Recipe) -> bool:
    """Whether this run is FSDP; refuse an FSDP launch that Accelerate did not make one, and what FSDP here
    does not do."""
    from accelerate import __version__
    from accelerate.utils import DistributedType

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if not fsdp and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ProtegeError(
            f"the launch asks for FSDP, but Accelerate {__version__} runs this job as "
            f"{accelerator.distributed_type.value}: it turns FSDP on for GPUs and other accelerators, not for CPU "
            "processes, so every process would hold the whole teacher. Launch the FSDP config on GPUs, or launch "
            "without it (DDP)"
        )
    if not fsdp:
        return False
    if not accelerator.is_fsdp2:
        raise ProtegeError("protege shards the teacher with FSDP2: set fsdp_version: 2 in the Accelerate config")
    if recipe.training.distill == "on_policy":
        raise ProtegeError("training.distill 'on_policy' under FSDP is not supported: the student samples its replies "
                           "outside FSDP's forward; launch it with DDP (no FSDP config)")
    if recipe.student.lora_r:
        raise ProtegeError("student.lora_r under FSDP is not supported; a LoRA student is small enough for DDP "
                           "(launch without the FSDP config)")
    return True


def _fsdp_mesh(accelerator: Any) -> Any:
    """The mesh Accelerate shards the student over (None: every process, FSDP's default)."""
    mesh = getattr(accelerator, "torch_device_mesh", None)
    return mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None


# -- on-policy samples ---------------------------------------------------------------------------------------


def _all_sampled(cfg: Any) -> bool:
    return cfg.distill == "on_policy" and cfg.on_policy_fraction == 1.0


def _served(recipe: Recipe) -> bool:
    """On-policy from a served teacher (it scores the samples over HTTP), not from a local 'hf:' one."""
    return recipe.training.distill == "on_policy" and not recipe.teacher.model.startswith("hf:")


class _Served:
    """A served teacher's scores of the student's samples, as per-token top-k targets in the student's ids.

    The requests go through :func:`protege.labeling.scoring.score_tokens` (store, engine, budget). The server's
    alternatives come as ids (vLLM) or as strings (llama.cpp), mapped onto the student's vocabulary as the topk
    mode maps an API teacher's (``_TopK``); the sampled token is always the student's id. Positions the teacher
    did not score (a llama.cpp server that tokenized the text otherwise there) have no KD term.
    """

    def __init__(self, recipe: Recipe, tokenizer: Any, store: Any):
        from ..labeling.scoring import score_tokens
        from .._io import content_hash
        from ..teachers import make_teacher

        self.recipe, self.tokenizer, self.store, self.score_tokens = recipe, tokenizer, store, score_tokens
        self.teacher = make_teacher(recipe.teacher)
        self.topk = _TopK(tokenizer)
        self.special = set(tokenizer.all_special_ids)
        # the tokenizer the ids belong to enters every cache key: its class, size and whole vocabulary
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        self.name = f"{type(tokenizer).__name__}:{len(tokenizer)}:{content_hash(vocab)[:16]}"
        self.calls = self.positions = self.scored = 0

    def request(self, ids: list[int], start: int, k: int) -> Any:
        from ..teachers.base import ScoreRequest
        from ..teachers._scoring import server_piece

        return ScoreRequest(
            ids=tuple(ids), start=start, top_logprobs=k, tokenizer=self.name,
            text=self.tokenizer.decode(ids, clean_up_tokenization_spaces=False),
            tokens=tuple("" if i in self.special else server_piece(self.topk.pieces[i]) for i in ids),
        )

    def check_tokenizer(self, example: _Example) -> None:
        """Refuse a server whose tokenizer is not the student's: it must read a prompt the student's tokenizer
        wrote (its canonical tokens) as the same tokens, at 90% of the positions at least."""
        from ..store import call_key
        from ..teachers._scoring import server_piece

        r = self.request(example.ids[: example.n_prompt], 1, 1)
        [tl], calls = self.score_tokens(self.teacher, self.recipe.teacher, self.store, [r])
        self.calls += calls
        if tl is None:
            reason = self.store.failures([call_key(self.teacher.identity, r.to_json())])
            raise ProtegeError(f"the served teacher {self.recipe.teacher.model!r} did not score a prompt "
                               f"({next(iter(reason.values()), ('no reason recorded',))[0]}); check teacher.base_url "
                               "and that the server is up")
        same = sum(
            t in top and t == server_piece(self.topk.pieces[i]) or i in self.special and t in top
            for t, top, i in zip(tl.tokens, tl.top, r.ids[1:])
        )
        if same < 0.9 * (len(r.ids) - 1):
            raise ProtegeError(
                f"training.distill 'on_policy' needs the served teacher's tokenizer to be the student's: teacher "
                f"{self.recipe.teacher.model!r} reads only {same} of the {len(r.ids) - 1} tokens of a prompt as the "
                "student's tokenizer wrote them. Use a student with the teacher's tokenizer, or training.distill "
                "'topk' (it maps another tokenizer's top-k) or 'sequence'"
            )

    def targets(self, examples: list[_Example], originals: list[_Example]) -> list[_Example]:
        """``examples`` (the student's samples) with the teacher's top-k targets at every reply token. The teacher
        reads each reply after the whole prompt of its ``originals`` row (the student's may have been cut)."""
        k = self.recipe.teacher.top_logprobs
        reqs = [
            self.request(o.ids[: o.n_prompt] + e.ids[e.n_prompt :], o.n_prompt, k) for e, o in zip(examples, originals)
        ]
        scores, calls = self.score_tokens(self.teacher, self.recipe.teacher, self.store, reqs)
        self.calls += calls
        out = []
        for e, tl in zip(examples, scores):
            n = len(e.ids) - e.n_prompt
            kd_ids, kd_lps = [[] for _ in range(n)], [[] for _ in range(n)]
            for j in range(n if tl is not None else 0):
                token, top, given = tl.tokens[j], tl.top[j], e.ids[e.n_prompt + j]
                if token not in top:
                    continue  # not scored here
                if tl.top_ids is not None:
                    pairs = dict(zip(tl.top_ids[j], tl.top_logprobs[j]))
                else:
                    pairs = {given: top[token]}
                    for s, lp in top.items():
                        sid = self.topk.by_piece.get(s) if s != token else None
                        self.topk.mass += math.exp(lp)
                        if sid is None:
                            self.topk.unmapped += math.exp(lp) if s != token else 0.0  # goes to the tail bucket
                        else:
                            pairs.setdefault(sid, lp)
                kd_ids[j], kd_lps[j] = list(pairs), list(pairs.values())
                self.scored += 1
            self.positions += n
            out.append(_Example(e.ids, e.n_prompt, e.weight, kd_ids, kd_lps))
        return out

    def figures(self) -> dict[str, Any]:
        return {"scored_share": self.scored / self.positions if self.positions else 0.0, "score_calls": self.calls,
                "unmapped_mass": self.topk.unmapped / self.topk.mass if self.topk.mass else 0.0}


def _on_policy_examples(
    model: Any, examples: list[_Example], stop_ids: tuple[int, ...], max_len: int, cfg: Any, seed: int
) -> list[_Example]:
    """``examples`` with the teacher's reply replaced by one the student samples (training.on_policy_*); prompts
    are cut from their start to leave room for on_policy_max_tokens within student.max_length."""
    room = max_len - cfg.on_policy_max_tokens  # >= 1: the recipe refuses max_tokens >= max_length
    prompts = [e.ids[: e.n_prompt][-room:] for e in examples]
    replies = sample_replies(model, prompts, stop_ids=stop_ids, max_new_tokens=cfg.on_policy_max_tokens,
                             temperature=cfg.on_policy_temperature, seed=seed)
    return [_Example(p + r, len(p), e.weight, [], []) for p, r, e in zip(prompts, replies, examples)]


# -- the loop -----------------------------------------------------------------------------------------------


def train_lm(
    recipe: Recipe,
    rows: list[LMRow],
    out: Path,
    quiet: bool = False,
    extra_meta: dict[str, Any] | None = None,
    store: Any = None,
) -> dict[str, Any]:
    """Train a causal LM student on ``rows`` as the recipe says and save it to ``out``.

    ``store``: the :class:`protege.store.Store` a served on-policy teacher's scores are cached and costed in.

    Returns the training summary also written to ``out/protege.json``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..teachers.hf import pick_dtype

    cfg, scfg, tcfg = recipe.training, recipe.student, recipe.teacher
    if not rows:
        raise ProtegeError("no training rows: label some data first (`protege label`)")
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if cuda and torch.cuda.is_bf16_supported() else "no",
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
        **tracker_settings(recipe),  # refuses a tracker that is not installed, before any work
    )
    set_seed(cfg.seed)
    P, G, B = accelerator.num_processes, cfg.gradient_accumulation_steps, cfg.batch_size
    check_split(B, G, P)
    fsdp = _check_fsdp(accelerator, recipe)

    # -- models -------------------------------------------------------------------------------------------
    served = _served(recipe)  # on-policy from a served teacher's top-k, through the store
    if served and store is None:
        raise ProtegeError("on-policy training from a served teacher needs the store its scores are kept in")
    # the local teacher's full distribution, at training time
    token_level = cfg.distill == "logits" or cfg.distill == "on_policy" and not served
    need_teacher = token_level or scfg.init == "teacher_layers"
    teacher = load_causal_lm(tcfg.model.removeprefix("hf:"), trust_remote_code=tcfg.trust_remote_code) if need_teacher else None
    model, tokenizer = build_lm_student(recipe, teacher)
    t_hidden = teacher_head = None
    sharding: dict[str, Any] = {}
    if token_level:
        t_model, t_tok = teacher
        check_vocab(
            model.get_output_embeddings().weight.shape[0], t_model.get_output_embeddings().weight.shape[0],
            tokenizer, t_tok,
        )
        t_model = t_model.to(dtype=pick_dtype(tcfg.dtype, accelerator.device)).eval().requires_grad_(False)
        if fsdp:  # each unit is moved to the device as it is sharded, so no device ever holds the whole teacher
            t_hidden = _shard_teacher(t_model, _fsdp_mesh(accelerator))
            local = sum(p.to_local().numel() for p in t_model.parameters())  # this process's shard
            per_process = accelerator.gather(torch.tensor([float(local)], device=accelerator.device))
            sharding["teacher_sharded"] = {
                "parameters": sum(p.numel() for p in t_model.parameters()),
                "per_process": [int(x) for x in per_process.tolist()],
            }
        else:
            t_model = t_model.to(accelerator.device)
            t_hidden, teacher_head = _TeacherHidden(t_model), lm_head(t_model)
    elif teacher is not None:
        teacher = None  # the student has its copy; free the teacher
    lr = cfg.learning_rate or (2e-4 if scfg.lora_r else 5e-5)

    examples, data = _encode(recipe, rows, tokenizer)
    n = len(examples)
    scorer = None
    if served:
        scorer = _Served(recipe, tokenizer, store)
        scorer.check_tokenizer(examples[0])  # before any step: a server with another tokenizer is refused
    steps_per_epoch = math.ceil(n / B)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch

    student = _StudentLoss(model, recipe)
    optimizer, scheduler = make_optimizer(student, cfg, lr, total)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)

    # -- resume -------------------------------------------------------------------------------------------
    ckpt, fp = checkpoint_dir(out), fingerprint(recipe, rows)
    start, log = resume(accelerator, ckpt, fp, quiet)
    start_tracking(accelerator, recipe, out, start, **{"training.learning_rate": lr})

    # -- train --------------------------------------------------------------------------------------------
    rank, pad = accelerator.process_index, tokenizer.pad_token_id
    stop_ids = ChatFormat.of(tokenizer, model).stop_ids  # where a sampled reply ends, as in evaluation and serving
    sampler = accelerator.unwrap_model(student).base()  # the student itself, outside DDP's wrapper
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(total=total, initial=start, desc=f"train {cfg.distill}", unit="step", disable=quiet or not accelerator.is_main_process)
    student.train()
    for step in range(start, total):
        epoch, step_rows, mine = micro_batches(step, n, cfg.seed, B, G, P, rank)
        parts = [[examples[i] for i in idx] for idx in mine]
        sampled = cfg.distill == "on_policy" and sampled_step(cfg.seed, step, cfg.on_policy_fraction)
        if sampled:
            # the student writes this step's replies, every micro-batch's before any gradient (the token count
            # below needs them all); the draws are fixed by the seed and the step, so a resumed run redraws them
            parts = [
                _on_policy_examples(sampler, ex, stop_ids, scfg.max_length, cfg, sample_seed(cfg.seed, step, j, rank))
                for j, ex in enumerate(parts)
            ]
            if scorer is not None:  # the served teacher scores them (cached: a resumed run redraws and reuses)
                parts = [scorer.targets(ex, [examples[i] for i in idx]) if ex else ex for ex, idx in zip(parts, mine)]
        # Normalize once: the loss of every micro-batch is divided by the target weight of the whole step over
        # all processes, times P because DDP averages the processes' gradients.
        local = sum(e.weight * (len(e.ids) - e.n_prompt) for ex in parts for e in ex)
        count = accelerator.reduce(torch.tensor(float(local), device=accelerator.device), "sum")
        scale = P / count.clamp_min(1e-12)
        sums = torch.zeros(3, device=accelerator.device)
        for j, idx in enumerate(mine):
            # an empty shard (fewer rows than micro-batches in the last step) still runs, with no weight, so every
            # process does the same forward and backward passes
            batch = _collate(parts[j] or [examples[step_rows[0]]], pad, cfg.distill == "topk" or served)
            batch = {key: v.to(accelerator.device) for key, v in batch.items()}
            t_out = None
            if t_hidden is not None:
                if fsdp:
                    t_hidden.unshard()  # the root unit (embeddings, norm, head) whole until this micro-batch's backward
                with torch.no_grad():
                    th = t_hidden(batch["input_ids"], batch["attention_mask"], batch["select"])  # (M, Ht)
                t_out = (th, *(teacher_head or lm_head(t_model)))
            sync = j == G - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(student):
                loss_sum, ce_sum, kd_sum = student(batch, t_out, sampled)
                accelerator.backward(loss_sum * (scale if idx else 0.0))
            if fsdp and t_hidden is not None:
                del t_out  # the gathered head is freed by reshard; nothing may hold it
                t_hidden.reshard()
            if idx:
                sums += torch.stack([loss_sum.detach(), ce_sum, kd_sum])
                tokens += int(batch["attention_mask"].sum())
        grad_norm = None
        if cfg.max_grad_norm is not None:  # the whole step's gradient: every micro-batch, every process
            grad_norm = float(accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums = accelerator.reduce(sums, "sum") / count
        rec = {
            "step": step + 1,
            "epoch": epoch,
            **({"on_policy": sampled} if cfg.distill == "on_policy" else {}),
            "loss": sums[0].item(),
            "kd_loss": sums[2].item(),
            "ce_loss": sums[1].item(),
            "lr": scheduler.get_last_lr()[0],
            **({"grad_norm": grad_norm} if grad_norm is not None else {}),  # before clipping
            "target_tokens": count.item(),
            "tokens_per_s": tokens * P / (time.perf_counter() - t0),  # approximate: this process's tokens x P
        }
        log.append(rec)
        log_step(accelerator, rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", kd=f"{rec['kd_loss']:.3f}", ce=f"{rec['ce_loss']:.3f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            flush_trackers(accelerator)  # first: once the checkpoint exists, the points it resumes after are on disk
            save_checkpoint(accelerator, ckpt, {"step": step + 1, "fingerprint": fp, "log": log})
    bar.close()
    seconds = time.perf_counter() - t0

    # -- save ---------------------------------------------------------------------------------------------
    trained = accelerator.unwrap_model(student).model
    if fsdp:  # the student's shards gathered (every process takes part) into a whole copy the main process saves
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if accelerator.is_main_process:
            whole = type(trained)(trained.config).to(next(iter(state.values())).dtype)
            whole.load_state_dict({key.removeprefix("model."): v for key, v in state.items()})
            trained = whole
    summary = {
        "distill": cfg.distill,
        "divergence": cfg.divergence if token_level or served else "forward_kl" if cfg.distill == "topk" else None,
        # on-policy steps alone (fraction 1) learn the divergence alone: alpha = 1
        "alpha": 0.0 if cfg.distill == "sequence" else 1.0 if _all_sampled(cfg) else cfg.alpha,
        **({"on_policy": {
            "fraction": cfg.on_policy_fraction,
            "temperature": cfg.on_policy_temperature,
            "max_tokens": cfg.on_policy_max_tokens,
            # from the log, which a resumed run has whole
            "sampled_steps": sum(1 for r in log if r.get("on_policy")),
            "sampled_tokens": int(sum(r["target_tokens"] for r in log if r.get("on_policy"))),
            **({"served_teacher": scorer.figures()} if scorer is not None else {}),
        }} if cfg.distill == "on_policy" else {}),
        "temperature": cfg.temperature,
        "learning_rate": lr,
        "steps": total,
        "resumed_from_step": start,
        "batch_size": B,
        "gradient_accumulation_steps": G,
        "processes": P,
        **({"fsdp": sharding} if fsdp else {}),
        "train_seconds": seconds,
        "parameters": count_parameters(trained),
        "trainable_parameters": sum(p.numel() for p in trained.parameters() if p.requires_grad),
        "lora_r": scfg.lora_r,
        "init": scfg.init,
        "layers": trained.config.num_hidden_layers if hasattr(trained, "config") else None,
        "teacher": tcfg.model,
        "final_loss": log[-1]["loss"] if log else None,
        **data,
        **(extra_meta or {}),
    }
    if accelerator.is_main_process:
        with atomic_dir(out) as tmp:
            # the card records the prompt format, answer prefix and end token the student was trained with
            save_lm_student(trained, tokenizer, tmp, StudentCard.for_lm(recipe, tokenizer, trained, summary))
            write_text_atomic(tmp / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
            recipe.save(tmp / "recipe.yaml")
            write_model_card(tmp)  # README.md, a Hub model card from the two files above (no figures yet)
        shutil.rmtree(ckpt, ignore_errors=True)
    end_tracking(accelerator)
    accelerator.wait_for_everyone()
    return summary
