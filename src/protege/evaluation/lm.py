"""Evaluate a causal LM student against its teacher on held-out prompts (generation tasks).

Figures per model, on the held-out split of the signal dataset:

- **top-1 agreement**: teacher-forced on the teacher's reply (in the student's tokenization, then the end of
  turn), the share of positions where the student's most likely next token is the teacher's token. A greedy
  teacher's token is its own top-1, so this is how often the two would pick the same next token.
- **KL to the teacher**: mean per token of KL(teacher || student) at temperature 1 over those positions.
  Over the full vocabulary when the teacher is a local model with the student's tokenizer (run here); over
  the stored top-k plus one tail bucket when only the teacher's top-k token ids are known (see
  :func:`protege.training.losses.topk_distillation_loss`); not reported otherwise (another tokenizer: the figure
  would not compare like with like).
- **perplexity** of the teacher's replies under the model: exp(mean NLL per token).
- **task metric** against the data's reference answers where the recipe names one (``task.metric``), for
  the student's own greedy answers and for the teacher's; **answer agreement**: how often the student's
  final answer equals the teacher's.
- **generation speed**: greedy generation one prompt at a time, as the server answers (p50/p95 latency,
  answers and generated tokens per second), and from it the compute cost per 1,000 requests
  (:func:`protege.evaluation.measure.compute_cost`: 1,000 x the mean latency at the compute price). An API
  teacher's speed and cost are what labeling recorded, never a new paid call.
"""

from __future__ import annotations

import difflib
import json
import math
import statistics
import time
from typing import Any

import torch

from .._io import content_hash, write_json_atomic, write_text_atomic
from ..errors import ProtegeError
from ..recipe import Recipe
from ..students.chat import ChatFormat
from ..teachers.parse import ParseError, split_rationale
from .measure import Speed, _api_teacher_figures, compute_cost, summarize_latency

__all__ = ["evaluate_lm", "lm_figures", "score_answer"]

STUDENT_DIR = "student"


def _norm(s: str) -> str:
    return " ".join(s.strip().strip(".").casefold().split())


def score_answer(metric: str, answer: str | None, reference: str) -> float:
    """``exact_match``: 1.0 when the answers agree ignoring case, surrounding space and a final full stop;
    ``similarity``: difflib's character ratio of the normalised strings (0..1). A missing answer scores 0."""
    if answer is None:
        return 0.0
    if metric == "exact_match":
        return float(_norm(answer) == _norm(reference))
    return difflib.SequenceMatcher(None, _norm(answer), _norm(reference)).ratio()


def parse_answer(text: str, rationale: bool) -> str | None:
    if not rationale:
        return text.strip()
    try:
        return split_rationale(text)[1]
    except ParseError:
        return None


@torch.inference_mode()
def _forced(model: Any, prompt: list[int], target: list[int]) -> torch.Tensor:
    """Log-probabilities (T, V) the model gives each position of ``target`` after ``prompt``."""
    ids = torch.tensor([prompt + target])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (T, V)
    return torch.log_softmax(logits, -1)


def _generate(
    model: Any, tok: Any, prompt: list[int], chat: ChatFormat, max_new_tokens: int
) -> tuple[str, int, float, float]:
    """(text, generated tokens, seconds, confidence) of greedy generation for one prompt, through the decoding
    loop the server runs (:func:`protege.students.generate.greedy`), so the confidence is the one its cascade
    routes by for the same prompt."""
    from ..students.generate import greedy

    d = greedy(model, prompt, chat.stop_ids, max_new_tokens)
    return tok.decode(d.ids, skip_special_tokens=True), len(d.ids), d.seconds, d.confidence


def _same_vocab(a: Any, b: Any) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


def lm_figures(
    model: Any,
    tok: Any,
    rows: list[dict[str, Any]],
    recipe: Recipe,
    *,
    teacher_model: Any = None,
    teacher_tok: Any = None,
    generate: bool = True,
    chat: ChatFormat | None = None,
    record: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The figures above for one model over held-out generation rows (see :mod:`protege.labeling.labeler`'s signal
    dataset). ``teacher_model`` (a local teacher, same tokenizer) gives the full-vocabulary KL.

    ``chat``: the model's prompt format and stop tokens, a student's from its card (None: those of the tokenizer
    and model as they are, for a local teacher). A student distilled step-by-step answers after its card's
    answer prefix and writes the answer alone; it is then scored on the teacher's answers (not its whole
    replies, which hold the rationale), and no KL is reported (the teacher answered in another context, after
    its rationale).

    ``record``, if given, receives one {"row", "answer", "confidence"} per generated answer (the cascade sweep)."""
    chat = chat or ChatFormat.of(tok, model)
    answer_prefix = chat.answer_prefix
    rationale = recipe.task.answer_format == "rationale"
    max_new = recipe.teacher.max_tokens or (512 if rationale else 256)
    full_kl = teacher_model is not None and teacher_tok is not None and _same_vocab(tok, teacher_tok) and not answer_prefix
    nll = agree = tokens = 0.0
    kl_sum, kl_n = 0.0, 0
    kl_kind = "full vocabulary" if full_kl else None
    lat, gen_tokens, gen_seconds = [], 0, 0.0
    answers, metric_scores, answer_agree = [], [], []
    for r in rows:
        messages = tuple(r["messages"])
        reference, ends = r["teacher_text"], not r.get("truncated")
        if answer_prefix:
            if r.get("answer") is None:
                continue  # the teacher gave no answer to compare with
            reference, ends = r["answer"], True
        prompt = chat.prompt_ids(tok, messages)  # the answer prefix before the last user turn, where there is one
        # the end of turn (as training appended it) is part of the answer, unless the teacher was cut off
        target = tok(reference, add_special_tokens=False)["input_ids"] + ([chat.end_token_id] if ends else [])
        lp = _forced(model, prompt, target)  # (T, V)
        tgt = torch.tensor(target)
        nll -= float(lp.gather(1, tgt[:, None]).sum())
        agree += float((lp.argmax(-1) == tgt).sum())
        tokens += len(target)
        if full_kl:
            t_lp = _forced(teacher_model, prompt, target)
            v = min(lp.shape[-1], t_lp.shape[-1])
            p = t_lp[:, :v].exp()
            kl_sum += float((p * (t_lp[:, :v] - lp[:, :v])).nansum())
            kl_n += len(target)
        elif (
            not answer_prefix
            and (tl := r.get("token_logprobs"))
            and tl.get("top_ids")
            and list(tl["ids"]) == target[: len(tl["ids"])]
        ):
            # the teacher's own ids match the student's tokenization of its reply: compare over top-k + tail
            from ..training.losses import topk_distillation_loss

            n = len(tl["ids"])
            k = max(len(x) for x in tl["top_ids"])
            ids = torch.full((n, k), -1, dtype=torch.long)
            lps = torch.full((n, k), -math.inf)
            for i, (a, b) in enumerate(zip(tl["top_ids"], tl["top_logprobs"])):
                ids[i, : len(a)] = torch.tensor(a)
                lps[i, : len(b)] = torch.tensor(b)
            kl, count, _ = topk_distillation_loss(lp[:n], ids, lps, tgt[:n], alpha=1.0, temperature=1.0)
            kl_sum += float(kl)
            kl_n += int(count)
            kl_kind = kl_kind or f"top-{k} + tail"
        if generate:
            text, n_new, seconds, confidence = _generate(model, tok, prompt, chat, max_new)
            lat.append(seconds)
            gen_tokens += n_new
            gen_seconds += seconds
            answer = text.strip() if answer_prefix else parse_answer(text, rationale)
            answers.append(answer)
            if record is not None:
                record.append({"row": r, "answer": answer, "confidence": confidence})
            if r.get("answer") is not None:
                answer_agree.append(answer is not None and _norm(answer) == _norm(r["answer"]))
            if recipe.task.metric and r.get("gold") is not None:
                metric_scores.append(score_answer(recipe.task.metric, answer, r["gold"]))
    out: dict[str, Any] = {
        "eval_tokens": int(tokens),
        "top1_agreement": agree / tokens if tokens else None,
        "perplexity_on_teacher": math.exp(nll / tokens) if tokens else None,
        "kl_to_teacher": kl_sum / kl_n if kl_n else None,
        "kl_support": kl_kind if kl_n else None,
    }
    if generate and lat:
        out |= {
            "task_metric": statistics.mean(metric_scores) if metric_scores else None,
            "answer_agreement": statistics.mean(answer_agree) if answer_agree else None,
            # answered one at a time, as the server does: answers per second is 1 / the mean latency
            **Speed(summarize_latency(lat), len(lat) / gen_seconds).report_fields(),
            "tokens_per_s": gen_tokens / gen_seconds if gen_seconds else None,
            "mean_generated_tokens": gen_tokens / len(lat),
            "sample_answers": answers[:3],
        }
    return out


def _teacher_figures(recipe: Recipe, rows: list[dict[str, Any]], student_tok: Any) -> tuple[dict[str, Any], Any, Any]:
    """The teacher's row of the report, and (model, tokenizer) when it is a local model."""
    from ..teachers import make_teacher

    teacher = make_teacher(recipe.teacher)
    figures: dict[str, Any] = {"name": recipe.teacher.model}
    if recipe.task.metric:
        scored = [score_answer(recipe.task.metric, r["answer"], r["gold"]) for r in rows if r.get("gold") is not None]
        figures["task_metric"] = statistics.mean(scored) if scored else None
    if teacher.kind == "local":  # a local model: time it here, like the student
        model, tok = teacher.model_and_tokenizer()
        figures["parameters"] = sum(p.numel() for p in model.parameters())
        n = min(len(rows), recipe.eval.latency_samples)
        timed = lm_figures(model, tok, rows[:n], recipe)
        usd_h = recipe.eval.compute_usd_per_hour
        figures |= {k: timed[k] for k in ("latency_ms_p50", "latency_ms_p95", "throughput_per_s", "tokens_per_s",
                                          "mean_generated_tokens")}
        figures |= compute_cost(timed["throughput_per_s"], usd_h)
        return figures, model, tok
    speed, money = _api_teacher_figures(recipe, [r["call_key"] for r in rows])
    from ..store import Store

    with Store(recipe.store_path) as store:
        answered = [u for u in store.call_usage([r["call_key"] for r in rows]).values() if u.status == "ok"]
    secs, out_tokens = sum(u.seconds for u in answered), sum(u.output_tokens for u in answered)
    figures |= {
        **speed.latency.report_fields(),
        "tokens_per_s": out_tokens / secs if secs else None,
        **money,
    }
    return figures, None, None


def evaluate_lm(recipe: Recipe, quiet: bool = False, force: bool = True) -> dict[str, Any]:
    """Stage 3 for generation tasks: write report.json and report.md comparing student and teacher."""
    from ..labeling.labeler import read_signals
    from ..store import Store

    out = recipe.output_dir
    rows = read_signals(recipe, "eval")
    if not rows:
        raise ProtegeError("the held-out split has no answered rows; check signals/failed.jsonl and relabel")
    student_dir = out / STUDENT_DIR
    from ..students.lm import load_lm_student

    model, tok, card = load_lm_student(student_dir)
    meta = card.to_json()
    inputs_hash = content_hash({"eval": recipe.section_hash("eval", "task"), "signals": content_hash(rows), "student": meta})[:16]
    report_path = out / "report.json"
    if not force and report_path.is_file() and json.loads(report_path.read_text()).get("inputs_hash") == inputs_hash:
        return json.loads(report_path.read_text())

    started = time.perf_counter()
    teacher, t_model, t_tok = _teacher_figures(recipe, rows, tok)
    answered: list[dict[str, Any]] = []
    # the student's card says how it is prompted (its answer prefix, if it was distilled step by step)
    s = lm_figures(model, tok, rows, recipe, teacher_model=t_model, teacher_tok=t_tok, chat=card.chat,
                   record=answered)
    usd_h = recipe.eval.compute_usd_per_hour
    student = {
        "name": "distilled student",
        "distill": meta.get("distill", recipe.training.distill),
        "parameters": sum(p.numel() for p in model.parameters()),
        **s,
        **compute_cost(s["throughput_per_s"], usd_h),
        "train_seconds": meta.get("train_seconds"),
    }
    for m in (teacher, student):
        m["accuracy"] = m.get("task_metric")  # the one quality figure every report has
    report: dict[str, Any] = {
        "inputs_hash": inputs_hash,
        "kind": "generation",
        "task": {"metric": recipe.task.metric, "answer_format": recipe.task.answer_format},
        "eval_examples": len(rows),
        "eval_with_reference": sum(r.get("gold") is not None for r in rows),
        "teacher_without_answer": sum(r.get("answer") is None for r in rows),
        "models": {"teacher": teacher, STUDENT_DIR: student},
    }
    if recipe.eval.cascade_sweep and answered:
        report["cascade"] = {"student": STUDENT_DIR, **_cascade(answered, recipe, student, teacher)}
    with Store(recipe.store_path) as store:
        store.log_compute("eval", time.perf_counter() - started, examples=len(rows))
        report["ledger"] = {"teacher": store.teacher_totals(recipe.teacher.model), "compute": store.compute_totals()}
    report["plots"] = []
    if report.get("cascade"):
        from .report import cascade_plot

        report["plots"].append(cascade_plot(report, out))
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", _markdown(report, recipe))
    recipe.save(out / "recipe.yaml")
    return report


def _cascade(answered: list[dict[str, Any]], recipe: Recipe, student: dict[str, Any],
             teacher: dict[str, Any]) -> dict[str, Any]:
    """The threshold sweep over the student's held-out answers (:func:`protege.evaluation.sweep.sweep`): scored by the
    task metric where the rows have reference answers, else by agreement with the teacher's answer."""
    import numpy as np

    from .sweep import sweep

    metric = recipe.task.metric
    with_gold = bool(metric) and any(a["row"].get("gold") is not None for a in answered)
    s_score, t_score, scored = [], [], []
    for a in answered:
        r = a["row"]
        if with_gold:
            ok = r.get("gold") is not None
            s_score.append(score_answer(metric, a["answer"], r["gold"]) if ok else 0.0)
            t_score.append(score_answer(metric, r.get("answer"), r["gold"]) if ok else 0.0)
        else:
            ok = r.get("answer") is not None
            s_score.append(float(ok and a["answer"] is not None and _norm(a["answer"]) == _norm(r["answer"])))
            t_score.append(1.0)
        scored.append(ok)
    return sweep(np.array([a["confidence"] for a in answered]), np.array(s_score), np.array(t_score),
                 np.array(scored), metric if with_gold else "agreement_with_teacher",
                 "geometric mean token probability", student["usd_per_1k"], teacher["usd_per_1k"],
                 recipe.eval.keep_fraction)


def _fmt(x: Any, spec: str = ".3f", pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else format(x, spec)


def _markdown(report: dict[str, Any], recipe: Recipe) -> str:
    from .report import cascade_lines, cost_definition

    s = report["models"][STUDENT_DIR]
    metric = report["task"]["metric"]
    lines = [
        "# protege report (generation)",
        "",
        f"Held-out split: {report['eval_examples']} prompts ({report['eval_with_reference']} with reference "
        f"answers). Student trained by {s['distill']}-level distillation.",
        "",
        f"| model | params | {metric or 'task metric'} | top-1 agreement | KL to teacher | perplexity on teacher | "
        "answer agreement | p50 ms | tokens/s | $ / 1k |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, m in report["models"].items():
        label = f"teacher: {m['name']}" if key == "teacher" else m["name"]
        params = f"{m['parameters'] / 1e6:.1f}M" if m.get("parameters") else "n/a"
        lines.append(
            f"| {label} | {params} | {_fmt(m.get('task_metric'), pct=True)} | "
            f"{_fmt(m.get('top1_agreement', 1.0 if key == 'teacher' else None), pct=True)} | "
            f"{_fmt(m.get('kl_to_teacher', 0.0 if key == 'teacher' else None), '.4f')} | "
            f"{_fmt(m.get('perplexity_on_teacher'), '.2f')} | {_fmt(m.get('answer_agreement'), pct=True)} | "
            f"{_fmt(m.get('latency_ms_p50'), '.1f')} | {_fmt(m.get('tokens_per_s'), '.1f')} | "
            f"{_fmt(m.get('usd_per_1k'), '.5f')} |"
        )
    kl = s.get("kl_support")
    lines += [
        "",
        "Top-1 agreement and perplexity are teacher-forced on the teacher's replies; "
        + (f"KL is over the {kl}. " if kl else "KL is not reported: the teacher's token distribution is not known "
           "over the student's vocabulary. ")
        + "Latency and tokens per second are greedy generation one prompt at a time on this machine. An API "
        "teacher's figures are what labeling recorded.",
        "",
        cost_definition(recipe.eval.compute_usd_per_hour),
    ]
    if report.get("cascade"):
        lines += cascade_lines(report["cascade"])
        lines += ["", "![cascade](plots/cascade.png)"]
    if report["teacher_without_answer"]:
        lines.append(
            f"\nThe teacher's reply had no final 'Answer:' line on {report['teacher_without_answer']} held-out "
            "prompts; those count as wrong in its task metric."
        )
    return "\n".join(lines) + "\n"
