"""A saved student's ``README.md``: a Hugging Face Hub model card, so the directory can be pushed as it is.

Built from what the directory holds: the student's card (``protege.json``: kind, labels, teacher, task and the
training summary with α, τ, the distill mode and the recipe and signals hashes) and the recipe saved beside it
(where the student started from). Training writes it without figures; ``protege eval`` rewrites it with the
report's (:func:`write_model_card` with ``report``), both times atomically. The card is built and parsed back
with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard`, never hand-written YAML.

Nothing secret goes in: the teacher is named by its model and provider, never its base URL or key variable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .._io import write_text_atomic
from ..recipe import Recipe, build_recipe, hub_dataset_id
from .card import StudentCard

__all__ = ["README", "model_card", "write_model_card"]

README = "README.md"
# packaged model names (protege.sources.PACKAGED) and the hub repositories their weights come from
_HUB_IDS = {"all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
            "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_SIGNALS = {  # protege.signals.DistributionMethod, in a sentence each
    "logits": "the softmax of the teacher classifier's own logits over the labels",
    "label_logprobs": "the log-probabilities the teacher gives each label name as its answer, renormalised over "
                      "the labels",
    "samples": "the share of n sampled teacher answers that named each label",
    "hard_label": "the teacher's single answer (one-hot: no uncertainty to learn from)",
    "embedding": "a softmax over the cosine similarities of the text's embedding to each label's prototype",
    "ensemble": "a weighted mean of several teachers' label distributions",
}
_DISTILL = {  # training.distill of a language-model student
    "sequence": "cross-entropy on the teacher's text (sequence-level distillation: α = 0)",
    "logits": "L = (1 - α)·CE + α·τ²·D(p_teacher^τ, q_student^τ) per answer token, against the local teacher's "
              "full next-token distribution (same tokenizer), with D = {divergence}",
    "topk": "L = (1 - α)·CE + α·τ²·D(p_teacher^τ, q_student^τ) per answer token, against the teacher's stored "
            "top-k token log-probabilities plus one tail bucket for the rest of its probability, with D = "
            "{divergence}",
    "on_policy": "on-policy distillation (GKD, Agarwal et al. 2024): on a share λ = {fraction:g} of the steps the "
                 "student samples a reply to each prompt (temperature {temperature:g}, at most {max_tokens} tokens) "
                 "and learns τ²·D(p_teacher^τ, q_student^τ) on every token it wrote, against the local teacher's "
                 "full next-token distribution (same tokenizer); the other steps L = (1 - α)·CE + α·τ²·D on the "
                 "teacher's replies; D = {divergence}",
    "on_policy_served": "on-policy distillation (GKD, Agarwal et al. 2024): on a share λ = {fraction:g} of the steps "
                        "the student samples a reply to each prompt (temperature {temperature:g}, at most {max_tokens} "
                        "tokens) and learns τ²·D(p_teacher^τ, q_student^τ) on every token it wrote, against the served "
                        "teacher's top-k log-probabilities there, the sampled token's and one tail bucket (same "
                        "tokenizer); the other steps L = (1 - α)·CE + α·τ²·D on the teacher's stored top-k of its "
                        "replies; D = {divergence}",
}
_DIVERGENCE = {"forward_kl": "KL(p_teacher^τ ‖ q_student^τ)", "reverse_kl": "KL(q_student^τ ‖ p_teacher^τ)",
               "jsd": "the generalized Jensen-Shannon divergence (training.jsd_beta)"}
# a report figure -> its metric name on the card (figures the report leaves None are left out)
_CLASSIFIER_METRICS = {"accuracy": "accuracy", "quality_kept": "quality_kept",
                       "agreement_with_teacher": "agreement_with_teacher", "ece": "expected_calibration_error",
                       "latency_ms_p50": "latency_ms_p50", "latency_ms_p95": "latency_ms_p95",
                       "throughput_per_s": "throughput_per_s", "usd_per_1k": "usd_per_1k_requests"}
_LM_METRICS = {"task_metric": None, "quality_kept": "quality_kept", "top1_agreement": "top1_agreement",
               "kl_to_teacher": "kl_to_teacher", "perplexity_on_teacher": "perplexity_on_teacher",
               "answer_agreement": "answer_agreement", "latency_ms_p50": "latency_ms_p50",
               "tokens_per_s": "tokens_per_s", "usd_per_1k": "usd_per_1k_requests"}


def write_model_card(student_dir: Path, report: dict[str, Any] | None = None) -> None:
    """(Re)write ``student_dir/README.md``; ``report`` is report.json's object once ``protege eval`` ran."""
    write_text_atomic(Path(student_dir) / README, str(model_card(student_dir, report)))


def model_card(student_dir: Path, report: dict[str, Any] | None = None) -> Any:
    """The :class:`huggingface_hub.ModelCard` of the student in ``student_dir`` (its protege.json and recipe.yaml
    written), with ``report``'s figures for it (``report["models"][student_dir.name]``) when given."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    student_dir = Path(student_dir)
    card = StudentCard.read(student_dir)
    recipe = build_recipe(yaml.safe_load((student_dir / "recipe.yaml").read_text(encoding="utf-8")),
                          source=str(student_dir / "recipe.yaml"))
    lm = card.kind == "causal_lm"
    pipeline_tag = "text-generation" if lm else "text-classification"
    figures = _figures(report, student_dir.name, lm)
    dataset = f"held-out split ({report['eval_examples']} examples)" if figures else ""
    results = [
        EvalResult(task_type=pipeline_tag, dataset_type="protege-held-out", dataset_name=dataset,
                   dataset_split="eval", metric_type=name, metric_value=value)
        for name, value in figures.items()
    ]
    base = _base_model(recipe, card)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        base_model=base,
        tags=["protege", "knowledge-distillation", "distillation", "text-classification" if not lm else "causal-lm"],
        metrics=list(figures) or None,
        model_name=f"{recipe.output_dir.name}-{student_dir.name}" if results else None,
        eval_results=results or None,
    )
    body = "\n".join([
        *_intro(card, recipe),
        *_teacher(card, recipe, report),
        *(_lm_training(card) if lm else _classifier_training(card, recipe)),
        *_provenance(card, recipe, lm),
        *_evaluation(report, student_dir.name, lm),
        *_limits(card, recipe, report),
    ])
    # parse what was written back: the YAML block must be a valid card (a bad model-index raises here)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _figures(report: dict[str, Any] | None, key: str, lm: bool) -> dict[str, float]:
    """The card's metrics: this student's figures in the report, by their names on the card."""
    if not report or key not in report.get("models", {}):
        return {}
    m = dict(report["models"][key])
    names = dict(_LM_METRICS if lm else _CLASSIFIER_METRICS)
    if lm:
        names["task_metric"] = report["task"].get("metric") or "task_metric"
        t = report["models"]["teacher"].get("task_metric")
        if m.get("task_metric") is not None and t:  # as a classifier's: the share of the teacher's score kept
            m["quality_kept"] = m["task_metric"] / t
    return {name: float(m[k]) for k, name in names.items() if m.get(k) is not None}


def _base_model(recipe: Recipe, card: StudentCard) -> str | None:
    """The hub id the student's weights started from: its pretrained model, or the 'hf:' teacher its layers were
    cut from; None for a student made from scratch or from a local directory or file (not a hub id)."""
    init = card.summary.get("init", recipe.student.init)
    name = recipe.teacher.model.split(":", 1)[1] if init == "teacher_layers" else recipe.student.model
    if init == "scratch":
        return None
    if name in _HUB_IDS:
        return _HUB_IDS[name]
    return None if _local(name) or name.endswith(".gguf") else name


def _local(name: str) -> bool:
    """Whether a model name is a path on this machine (as :func:`protege.sources.resolve_source` tells)."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _where_from(name: str) -> str:
    """A model named for the card: a hub id as it is, a local path by its last component only."""
    if name in _HUB_IDS:
        return f"`{_HUB_IDS[name]}` (packaged as `{name}`)"
    return f"a local model (`{Path(name).expanduser().name}`)" if _local(name) else f"`{name}`"


def _teacher_name(model: str) -> str:
    """A teacher as the recipe names it, a local path by its last component only."""
    backend, _, rest = model.partition(":")
    return f"{backend}:{Path(rest).expanduser().name}" if _local(rest) else model  # hf:, embed: paths


def _intro(card: StudentCard, recipe: Recipe) -> list[str]:
    what = "text classifier" if card.labels else "causal language model"
    init = card.summary.get("init", recipe.student.init)
    # protege's own student types carry their class beside the weights (mean_pool.py, bilstm.py)
    own = ("it is a bidirectional LSTM, in bilstm.py" if recipe.student.architecture == "bilstm" else
           "its head reads the mean of the tokens' states, in mean_pool.py" if recipe.student.pooling == "mean" else None)
    remote = f" with `trust_remote_code=True`, the tokenizer too: {own}" if card.labels and own else ""
    start = {
        "pretrained": f"starting from {_where_from(recipe.student.model)}",
        "scratch": "from a small model made from scratch (only the tokenizer of "
                   f"{_where_from(recipe.student.model)} reused)",
        "teacher_layers": _cut(card.summary),
    }[init]
    lines = [f"# {recipe.output_dir.name}: a distilled {what}", "",
             f"A {what} distilled with protege from the teacher `{_teacher_name(card.teacher.model)}`, "
             f"{start}. It loads with transformers alone (`AutoModelFor"
             f"{'CausalLM' if not card.labels else 'SequenceClassification'}.from_pretrained`{remote})."]
    if card.labels:
        lines += ["", "Labels, in the order of its output head: " + ", ".join(f"`{x}`" for x in card.labels) + "."]
    lines += ["", f"Task instruction given to the teacher: {card.task.instruction!r}"]
    return lines


def _cut(s: dict[str, Any]) -> str:
    """How a student.init: teacher_layers student was cut from its teacher."""
    if s.get("kept_layers"):  # a classifier's summary lists them
        return f"from a copy of the teacher keeping its layers {s['kept_layers']}"
    n = s.get("layers")
    return f"from a copy of the teacher cut to {n} layer{'s' * (n != 1)}" if isinstance(n, int) else \
        "from a copy of the teacher keeping some of its layers"


def _teacher(card: StudentCard, recipe: Recipe, report: dict[str, Any] | None) -> list[str]:
    t = card.teacher
    lines = ["", "## Teacher and its signal", "", f"- Teacher: `{_teacher_name(t.model)}`"
             + (f" (provider: {t.provider})" if t.provider else "")]
    if t.members:
        lines += [f"  - member: `{_teacher_name(m.model)}`" for m in t.members]
    if card.labels:
        methods = _signal_methods(recipe, report)
        for m in methods:
            lines.append(f"- Signal: `{m}`, {_SIGNALS.get(m, 'see protege.signals')}.")
        if not methods:
            lines.append("- Signal: not recorded (the run's signals/train.jsonl was not found).")
        if t.few_shot or card.task.examples:
            lines.append(f"- Worked examples shown to the teacher: {len(card.task.examples)} in the task, plus "
                         f"{t.few_shot} per label drawn from the training rows.")
    else:
        lines.append("- Signal: the teacher's reply to each prompt"
                     + (", with its top-k token log-probabilities" if card.summary.get("distill") == "topk" else "")
                     + (", with its full next-token distribution at training time"
                        if card.summary.get("distill") == "logits" else "")
                     + ((", and its top-k log-probabilities on the student's own sampled replies, served, at "
                         "training time" if "served_teacher" in card.summary.get("on_policy", {}) else
                         ", and its full next-token distribution on the student's own sampled replies at training "
                         "time") if card.summary.get("distill") == "on_policy" else "") + ".")
    return lines


def _signal_methods(recipe: Recipe, report: dict[str, Any] | None) -> list[str]:
    """How the teacher's label distributions were made: as the report found them on the held-out rows, else as
    the run's training signals record them (none when the run's folder holds no signals)."""
    if report and report.get("models", {}).get("teacher", {}).get("signal_method"):
        return list(report["models"]["teacher"]["signal_method"])
    path = recipe.output_dir / "signals" / "train.jsonl"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return sorted({m for line in f if line.strip() and (m := json.loads(line).get("method"))})


def _classifier_training(card: StudentCard, recipe: Recipe) -> list[str]:
    s = card.summary
    lines = ["", "## Training", "",
             "L = (1 - α)·CE(y, ŷ) + α·τ²·KL(p_teacher^τ ‖ q_student^τ), with p^τ = softmax(z / τ), "
             f"**α = {s['alpha']:g}** and **τ = {s['temperature']:g}**; the hard target y is "
             + ("the gold label where the data has one, else " if recipe.training.use_gold else "")
             + "the teacher's top label.", ""]
    if s.get("alpha") == 0:
        lines += ["α = 0: this is the hard-label baseline, trained on the teacher's top labels alone.", ""]
    lines += _run_figures(s, ("examples", "steps", "batch_size", "learning_rate", "parameters"))
    if sweep := s.get("sweep"):
        lines.append(f"- α and τ chosen by a sweep over {len(sweep['trials'])} trials, by {sweep['metric']} on a "
                     "held-out slice of teacher-labelled training rows")
    if sel := s.get("selection"):
        lines.append(f"- checkpoint: the best step ({sel.get('best_step')}) by {recipe.training.select_metric} on a "
                     "held-out slice of teacher-labelled training rows")
    return lines


def _lm_training(card: StudentCard) -> list[str]:
    s = card.summary
    mode = s.get("distill", "sequence")
    served = "served_teacher" in s.get("on_policy", {})  # scored by a served teacher, not a local one
    loss = _DISTILL[mode + "_served" * served].format(divergence=_DIVERGENCE.get(s.get("divergence") or "forward_kl"),
                                 **s.get("on_policy", {}))
    lines = ["", "## Training", "", f"Distill mode `{mode}`: {loss}; **α = {s.get('alpha', 0):g}**, "
             f"**τ = {s.get('temperature', 1):g}**. The loss covers the answer tokens only."]
    if card.chat and card.chat.answer_prefix:
        lines.append(f"Distilled step by step: it was trained on the teacher's rationale too, and answers after "
                     f"`{card.chat.answer_prefix}`.")
    if topk := s.get("topk"):
        lines.append(f"Share of the teacher's tokens that lined up with the student's: {topk.get('aligned_share')}.")
    return lines + [""] + _run_figures(s, ("steps", "batch_size", "learning_rate", "parameters", "lora_r", "layers"))


def _run_figures(s: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [f"- {k.replace('_', ' ')}: {s[k]:,}" if isinstance(s[k], int) else f"- {k.replace('_', ' ')}: {s[k]:g}"
            for k in keys if isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool)]


def _data_name(path: Path, split: str | None) -> str:
    """A data file's name, or a Hub dataset's id, and the split of a Hugging Face dataset."""
    name = str(path) if hub_dataset_id(path) is not None else Path(path).name
    return f"`{name}`" + (f" (split `{split}`)" if split else "")


def _provenance(card: StudentCard, recipe: Recipe, lm: bool) -> list[str]:
    s, d = card.summary, recipe.data
    held = (_data_name(d.eval_path, d.eval_split) if d.eval_path else
            f"its split `{d.eval_split}`" if d.eval_split else f"{d.eval_fraction:.0%} of it")
    lines = ["", "## Data provenance", "",
             f"- training data: {_data_name(d.path, d.split)}, {'answered' if lm else 'labelled'} by the teacher; "
             f"held out for evaluation: {held}"]
    if s.get("recipe_hash"):
        lines.append(f"- recipe hash (task, data, teacher, student, training sections): `{s['recipe_hash']}`")
    if s.get("signals_hash"):
        lines.append(f"- signals hash (sha256 of the teacher signals trained on, signals/train.jsonl): "
                     f"`{s['signals_hash']}`")
    return lines + ["- every teacher call is logged in the run's protege.db, keyed by a content hash of the "
                    "teacher, prompt and parameters; the full settings are in recipe.yaml beside this card"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _evaluation(report: dict[str, Any] | None, key: str, lm: bool) -> list[str]:
    lines = ["", "## Evaluation", ""]
    if not report or key not in report.get("models", {}):
        return lines + ["Not evaluated yet: `protege eval` rewrites this card with the report's figures."]
    if lm:
        metric = report["task"].get("metric") or "task metric"
        t = report["models"]["teacher"].get("task_metric")
        rows = [f"| model | {metric} | quality kept | top-1 agreement | KL to teacher | p50 ms | tokens/s | $ / 1k |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for k, m in report["models"].items():
            kept = m["task_metric"] / t if t and m.get("task_metric") is not None else None
            rows.append(f"| {_row_name(k, m, key)} | {_pct(m.get('task_metric'))} | {_pct(kept)} | "
                        f"{_pct(m.get('top1_agreement', 1.0 if k == 'teacher' else None))} | "
                        f"{_num(m.get('kl_to_teacher', 0.0 if k == 'teacher' else None), '.4f')} | "
                        f"{_num(m.get('latency_ms_p50'), '.1f')} | {_num(m.get('tokens_per_s'), '.1f')} | "
                        f"{_num(m.get('usd_per_1k'), '.5f')} |")
        n = f"{report['eval_examples']} held-out prompts"
    else:
        rows = ["| model | accuracy (gold) | quality kept | agreement w/ teacher | p50 ms | p95 ms | $ / 1k |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for k, m in report["models"].items():
            rows.append(f"| {_row_name(k, m, key)} | {_pct(m.get('accuracy'))} | "
                        f"{_pct(m.get('quality_kept', 1.0 if k == 'teacher' else None))} | "
                        f"{_pct(m.get('agreement_with_teacher', 1.0 if k == 'teacher' else None))} | "
                        f"{_num(m.get('latency_ms_p50'), '.1f')} | {_num(m.get('latency_ms_p95'), '.1f')} | "
                        f"{_num(m.get('usd_per_1k'), '.5f')} |")
        n = f"{report['eval_examples']} held-out texts ({report['eval_with_gold']} with gold labels)"
    return lines + [f"From `protege eval` on {n}. Quality kept is the student's score over the teacher's; "
                    "latency is one request at a time on the evaluating machine; $ / 1k is the cost of 1,000 "
                    "requests (compute at the report's price per hour; an API teacher's recorded spend).", "",
                    *rows]


def _row_name(k: str, m: dict[str, Any], key: str) -> str:
    if k == "teacher":
        return f"teacher: {_teacher_name(m['name'])}"
    return f"**{m['name']} (this model)**" if k == key else m["name"]


def _limits(card: StudentCard, recipe: Recipe, report: dict[str, Any] | None) -> list[str]:
    what = "the labels above" if card.labels else "prompts like those it was trained on"
    gold = " (and the data's gold labels as hard targets, where it had them)" if card.labels and \
        recipe.training.use_gold else ""
    return ["", "## Intended use and limits", "",
            f"- Made for one task: {what}, on text like the data it was trained on.",
            f"- It learned from the teacher's answers on the user's data{gold}: it inherits the teacher's mistakes "
            "and biases.",
            "- Its quality was measured on the held-out split only"
            + (f" ({report['eval_examples']} examples)" if report else "")
            + "; on other data, other wording or other labels it is unmeasured.",
            "- Latency and cost figures come from the evaluating machine and the recipe's compute price; measure "
            "them again where it will run."]
