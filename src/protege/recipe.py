"""The recipe: every setting of a distillation run, validated, in one YAML file.

The same settings are Python objects (``Recipe(...)``) and CLI flags (``--training.alpha 0.7``). Relative
paths are resolved against the recipe file's directory. The resolved recipe is saved next to every
artifact, so each artifact says exactly how it was made.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._io import content_hash, write_text_atomic
from .errors import RecipeError

__all__ = [
    "Label",
    "TaskConfig",
    "DataConfig",
    "TeacherConfig",
    "StudentConfig",
    "TrainingConfig",
    "EvalConfig",
    "Recipe",
    "load_recipe",
]

# The prefixes of a teacher spec and the kind of teacher each makes ('local': a model in this process; 'api': calls
# to a provider). protege.teachers.BACKENDS has one factory for each, whose teachers declare the same kind (a test
# holds them equal), so a stage can tell the two apart from the recipe without building the teacher.
TEACHER_BACKENDS = {"hf": "local", "embed": "local", "openai": "api", "anthropic": "api"}
# The OpenAI-compatible providers whose completions endpoint scores given tokens, and how: 'prompt_logprobs' (vLLM:
# token ids in, the prompt's top-k by id out) or 'echo' (llama.cpp: text in, echo + logprobs give the prompt's
# tokens and top-k as strings). Declared here, below the teachers, so a recipe can refuse on_policy with a teacher
# that cannot score; protege.teachers.presets reads it (a test holds them equal).
SCORING_PROVIDERS = {"vllm": "prompt_logprobs", "llamacpp": "echo"}
# 'ensemble:mean' / 'ensemble:accuracy' is not a backend: it has no teacher of its own; its members (teacher
# sections) label, and protege.labeling.ensemble combines their distributions.
ENSEMBLE = "ensemble"
ENSEMBLE_WEIGHTINGS = ("mean", "accuracy")


DATA_FILE_SUFFIXES = (".jsonl", ".csv", ".parquet")
HUB_DATA_PREFIX = "hf:"  # data.path 'hf:owner/name': a Hugging Face Hub dataset

CLASSIFY_INSTRUCTION = "Classify the text into exactly one of the labels."
GENERATE_INSTRUCTION = "Answer the following."


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class Label(_Section):
    name: str = Field(min_length=1, description="The label as the teacher should answer it, e.g. 'billing'.")
    description: str = Field("", description="One line that tells the teacher what belongs under this label.")


class FewShotExample(_Section):
    text: str = Field(min_length=1, description="An example input, as the data's texts read.")
    label: str = Field(min_length=1, description="Its label (classification) or its answer (generation).")


class TaskConfig(_Section):
    """What is being distilled."""

    kind: Literal["classification", "generation"] = Field(
        "classification",
        description="'classification': pick one label per text (an encoder student). 'generation': answer in "
        "free text (a causal language-model student).",
    )
    instruction: str = Field(
        CLASSIFY_INSTRUCTION,
        min_length=1,
        description="What the teacher is asked to do; the labels and their descriptions are appended.",
    )
    labels: list[Label] = Field(
        default_factory=lambda: [Label(name="negative"), Label(name="positive")],
        description="The label set: a list of names, of {name, description} objects, or a name: description map.",
    )

    answer_format: Literal["text", "rationale"] = Field(
        "text",
        description="Generation: 'text' (the answer alone) or 'rationale' (the teacher explains, then gives the "
        "final answer on a last line 'Answer: ...'; the explanation is kept apart from the answer).",
    )
    metric: Literal["exact_match", "similarity"] | None = Field(
        None,
        description="Generation: how an answer is scored against the data's reference answers (label_column): "
        "'exact_match' of the parsed answer (case and surrounding spaces ignored), 'similarity' (character-level "
        "ratio, 0..1). Unset: no task metric, only agreement with the teacher.",
    )

    examples: list[FewShotExample] = Field(
        default_factory=list,
        description="Worked examples shown to the teacher with every text ({text, label} items): few-shot turns "
        "for LM and API teachers, extra label prototypes for an 'embed:' teacher. Part of the cache key. See also "
        "teacher.few_shot.",
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_from_shorthand(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return [{"name": k, "description": d or ""} for k, d in v.items()]
        if isinstance(v, list):
            return [{"name": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, v: list[Label]) -> list[Label]:
        if len(v) < 2:
            raise ValueError("a classification task needs at least two labels; list them under task.labels")
        seen: dict[str, str] = {}
        for label in v:
            key = label.name.strip().casefold()
            if key in seen:
                raise ValueError(
                    f"duplicate label {label.name!r} (same as {seen[key]!r} ignoring case and spaces); "
                    "give every label a distinct name"
                )
            seen[key] = label.name
        return v

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> TaskConfig:
        if self.kind == "generation" and self.instruction == CLASSIFY_INSTRUCTION:
            self.instruction = GENERATE_INSTRUCTION  # the classification default would mislead a writer
        if self.kind == "classification":
            names = {x.name.strip().casefold() for x in self.labels}
            bad = [e.label for e in self.examples if e.label.strip().casefold() not in names]
            if bad:
                raise ValueError(
                    f"task.examples label {bad[0]!r} is not one of task.labels {list(self.label_names)}; "
                    "fix the example or add the label"
                )
        if self.kind == "classification" and (self.answer_format != "text" or self.metric is not None):
            raise ValueError(
                "task.answer_format and task.metric apply to generation tasks; a classification task is scored "
                "by accuracy (for an explaining API teacher set teacher.rationale instead)"
            )
        return self

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)


class AugmentConfig(_Section):
    """Transfer-set augmentation (Tang et al. 2019): new unlabeled texts made from the training texts, labelled
    by the teacher like any text (same store, cache, budget cap and dry-run estimate), used only for training."""

    per_text: int = Field(
        0, ge=0, le=100, description="New texts made from each training text (0: off). They are never evaluated on."
    )
    mask_p: float = Field(0.1, ge=0, le=1, description="Chance each word is replaced by the student tokenizer's "
                          "mask token (or '[MASK]').")
    replace_p: float = Field(0.1, ge=0, le=1, description="Chance each word is replaced by another word of the "
                             "corpus with the same shape (case, digits), drawn by corpus frequency.")
    ngram_p: float = Field(0.25, ge=0, le=1, description="Chance a new text is cut to a random n-gram of the "
                           "original (n from 1 to ngram_max words, only for texts longer than n).")
    ngram_max: int = Field(5, ge=1, le=512, description="Longest n-gram, in words, that ngram_p cuts a text to (Tang "
                           "et al.: 5). Larger values also make clause-length spans of a sentence, as a treebank's "
                           "labelled phrases, for the teacher to label.")
    replace_with: Literal["corpus", "neighbours"] = Field(
        "corpus",
        description="Where replace_p's words come from. 'corpus': a word of the training texts with the same shape, "
        "by frequency (Tang et al.'s swap, offline). 'neighbours': one of the nearest whole words to it in "
        "student.model's word-embedding table ('good' -> 'terrific', 'bad'), so that the teacher also labels words the "
        "training texts never use; a word the table holds in several pieces is drawn from the corpus.",
    )
    neighbours: int = Field(10, ge=1, le=200, description="replace_with 'neighbours': how many nearest words a "
                            "swap draws from.")
    paraphrase: bool = Field(
        False,
        description="API teachers: also ask the teacher for one paraphrase per text (a generation call, cached and "
        "costed like a label call), which is then labelled like any text.",
    )


class DataConfig(_Section):
    """Where the texts come from and how the held-out split is taken."""

    path: Path = Field(
        Path("data.jsonl"),
        description="Training data: a .jsonl, .csv or .parquet file, a directory written by Hugging Face datasets' "
        "save_to_disk, or a Hub dataset as 'hf:owner/name' (the last two need pip install 'protege[datasets]').",
    )
    split: str | None = Field(
        None, min_length=1, description="Hugging Face datasets: the split to train on, of a DatasetDict directory or "
        "a Hub dataset, e.g. 'train'."
    )
    subset: str | None = Field(
        None, min_length=1, description="Hub datasets: the subset (datasets' configuration name), e.g. 'sst2' of "
        "'hf:nyu-mll/glue'."
    )
    text_column: str = Field("text", description="Column that holds the text to classify.")
    label_column: str | None = Field(
        None,
        description="Column with gold labels (empty cells allowed). Default: 'label' if the file has one.",
    )
    id_column: str | None = Field(
        None, description="Column with a stable row id. Default: 'id' if the file has one, else the line number."
    )
    eval_path: Path | None = Field(
        None, description="A second file (or dataset, as data.path) to evaluate on. When set, eval_fraction is not "
        "used."
    )
    eval_split: str | None = Field(
        None, min_length=1, description="Hugging Face datasets: the split to evaluate on, of data.eval_path's dataset "
        "if set, else of data.path's (e.g. 'test'; then eval_fraction is not used)."
    )
    eval_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Share of rows held out for evaluation before any training."
    )
    limit: int | None = Field(None, gt=0, description="Use only the first N rows of each file (quick runs).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _splits_fit_sources(self) -> DataConfig:
        for name in ("path", "eval_path"):
            if hub_dataset_id(getattr(self, name)) == "":
                raise ValueError(f"data.{name} 'hf:' needs a Hub dataset id after it, e.g. 'hf:stanfordnlp/sst2'")
        held = "eval_path" if self.eval_path is not None else "path"  # where data.eval_split is read from
        for setting, name in (("split", "path"), ("eval_split", held)):
            source = getattr(self, name)
            if getattr(self, setting) is not None and source.suffix.lower() in DATA_FILE_SUFFIXES:
                raise ValueError(
                    f"data.{setting} picks a split of a Hugging Face dataset, and data.{name} {str(source)!r} is a "
                    f"file; remove data.{setting} (a held-out file goes in data.eval_path)"
                )
        if self.subset is not None and not (hub_dataset_id(self.path) or hub_dataset_id(self.eval_path)):
            raise ValueError("data.subset picks a subset of a Hub dataset ('hf:owner/name'); remove it")
        if self.eval_path is None and self.eval_split is not None and self.eval_split == self.split:
            raise ValueError(
                f"data.eval_split {self.eval_split!r} is the training split data.split; hold out another split"
            )
        return self


def hub_dataset_id(path: Path | None) -> str | None:
    """The Hub id of a data path written 'hf:owner/name' (empty if nothing follows 'hf:'); None for a local path."""
    text = str(path) if path is not None else ""
    return text[len(HUB_DATA_PREFIX):] if text.startswith(HUB_DATA_PREFIX) else None


class TeacherConfig(_Section):
    """The expensive model that labels the data."""

    model: str = Field(
        "hf:smollm2-135m-instruct",
        description=(
            "'hf:' + a hub id, a local directory, a .gguf file, or a packaged model name "
            "(smollm2-135m-instruct); 'openai:MODEL' for any OpenAI-compatible API (see teacher.provider); "
            "'anthropic:MODEL'."
        ),
    )
    batch_size: int = Field(8, gt=0, description="Texts per forward pass (hf and embed teachers).")
    few_shot: int = Field(
        0,
        ge=0,
        le=32,
        description="Examples per label drawn (by training.seed) from the gold-labelled training rows and added to "
        "task.examples; those rows are then left out of training, and evaluation rows are never drawn.",
    )
    # embedding teachers -------------------------------------------------------------------------------------
    score_temperature: float = Field(
        0.05,
        gt=0,
        le=10,
        description="'embed:' teachers: softmax temperature over the cosine similarities of a text to each label's "
        "prototype (its 'name: description' and its examples). Lower is more confident.",
    )
    # ensembles ---------------------------------------------------------------------------------------------
    members: list[TeacherConfig] = Field(
        default_factory=list,
        description="'ensemble:mean' or 'ensemble:accuracy': the teachers whose label distributions are combined "
        "(each a teacher section of its own, cached under its own identity); 'accuracy' weighs each by its "
        "accuracy on the gold-labelled training rows.",
    )

    # API teachers --------------------------------------------------------------------------------------
    provider: str | None = Field(
        None,
        description="Preset for an 'openai:' teacher: openai, deepseek, moonshot, minimax, openrouter, together, "
        "vllm, llamacpp, ollama (base URL, key variable, prices). Default: openai.",
    )
    base_url: str | None = Field(None, description="API base URL; overrides the provider preset's.")
    api_key_env: str | None = Field(
        None,
        description="NAME of the environment variable that holds the API key (never the key itself); "
        "overrides the preset's, e.g. OPENAI_API_KEY.",
    )
    label_method: Literal["auto", "logprobs", "samples", "hard_label"] = Field(
        "auto",
        description="How an API teacher's label distribution is obtained: 'logprobs' (top_logprobs of the answer "
        "token), 'samples' (n sampled answers), 'hard_label' (one answer). 'auto': logprobs where the provider "
        "returns them, else samples. The method is recorded in every signal.",
    )
    n_samples: int = Field(10, ge=2, le=128, description="Answers sampled per text for label_method 'samples'.")
    sample_temperature: float = Field(1.0, gt=0, le=2, description="Temperature of those samples.")
    top_logprobs: int = Field(20, ge=1, le=20, description="Alternatives per generated token (OpenAI allows 20).")
    rationale: bool = Field(
        False,
        description="Ask the teacher to explain, then answer on a last line 'Answer: <label>'; the explanation "
        "is stored apart from the answer.",
    )
    thinking_tokens: int | None = Field(
        None, ge=1024, description="Anthropic extended thinking budget in tokens (thinking text is stored)."
    )
    max_tokens: int | None = Field(
        None, gt=0, description="Longest answer in tokens; default 16, or 512 with a rationale."
    )
    concurrency: int = Field(16, gt=0, le=1024, description="API calls in flight at once.")
    requests_per_minute: int | None = Field(None, gt=0, description="Client-side request rate limit.")
    tokens_per_minute: int | None = Field(None, gt=0, description="Client-side token rate limit (input + output).")
    max_retries: int = Field(
        6, ge=0, description="Retries per call on 429, 5xx, timeouts and dropped connections (backoff with jitter)."
    )
    parse_retries: int = Field(
        2, ge=0, description="Extra calls when an answer names no label; then the row is recorded as failed."
    )
    timeout_s: float = Field(60.0, gt=0, description="Seconds before one API call times out (and is retried).")
    budget_usd: float | None = Field(
        None,
        ge=0,
        description="Hard cap on teacher spend recorded in this run's store, all runs together. Each call's "
        "worst-case cost is reserved before it is sent. A later run with a higher cap continues.",
    )
    # selective labeling ----------------------------------------------------------------------------------
    select: Literal["all", "random", "uncertainty"] = Field(
        "all",
        description="Classification: which training texts the teacher labels. 'all': every one. 'uncertainty': a "
        "random seed slice, then rounds of the texts a student trained on what is labelled so far is least sure "
        "of (spread over its predicted labels and its hidden states), until select_max_rows, budget_usd or "
        "select_target. 'random': the same rounds drawn at random (the baseline). The evaluation split is always "
        "labelled in full; the rounds go to signals/selection.json and the report's learning curve.",
    )
    select_metric: Literal["margin", "entropy"] = Field(
        "margin",
        description="select 'uncertainty': how unsure the student is of a text: 'margin' (1 - (p1 - p2), the gap "
        "between its two likeliest labels) or 'entropy' (of its label distribution).",
    )
    select_seed_rows: int = Field(
        200, gt=0, description="select: training texts in the first, random, slice the teacher labels."
    )
    select_round_rows: int = Field(200, gt=0, description="select: texts the teacher labels in each later round.")
    select_random_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="select 'uncertainty': share of each later round drawn at random (the rest picked by "
        "uncertainty), so the labelled set still covers the texts the student is wrongly sure of. 0: uncertainty "
        "only; 1: the same as select 'random'.",
    )
    select_diversity: bool = Field(
        True,
        description="select 'uncertainty': spread a round's uncertainty picks by k-means++ over the student's "
        "pooled hidden states among the least sure 4x the round (false: those candidates taken in turn across the "
        "student's predicted labels, most uncertain first).",
    )
    select_student_labels: bool = Field(
        False,
        description="select: also train each round's student, and the final one, on the training texts the teacher "
        "was not asked about, with the label probabilities of a student trained on the teacher's answers so far "
        "(self-training: no teacher calls). The teacher's answers stay in signals/train.jsonl, the student's go to "
        "signals/student_labels.jsonl.",
    )
    select_max_rows: int | None = Field(
        None,
        gt=0,
        description="select: stop once this many training texts are labelled (with budget_usd, whichever comes "
        "first).",
    )
    select_target: float | None = Field(
        None,
        gt=0,
        le=1,
        description="select: stop once the student agrees with the teacher on this share of a held-out slice "
        "of teacher-labelled training texts (select_check_rows of them, drawn first, never picked by a round).",
    )
    select_check_rows: int = Field(
        200, gt=0, description="select_target: teacher-labelled training texts held out to check the target on."
    )
    price_input: float | None = Field(None, ge=0, description="USD per million input tokens; overrides the table.")
    price_cached_input: float | None = Field(None, ge=0, description="USD per million cached input tokens.")
    price_output: float | None = Field(None, ge=0, description="USD per million output tokens.")
    max_failed_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Rows the teacher may fail on (after retries) before labeling stops the pipeline; failed "
        "rows are listed in signals/failed.jsonl and left out of training.",
    )
    batch_api: bool = Field(
        False, description="Use the provider's batch API (OpenAI: half price, results within 24 h)."
    )
    batch_poll_s: float = Field(30.0, gt=0, description="Seconds between batch status checks.")
    calibrate: bool = Field(
        True,
        description="Contextual calibration for LM teachers: divide by the label distribution on content-free "
        "inputs, which removes a small LM's bias toward one label.",
    )
    max_length: int = Field(512, gt=8, description="Longest prompt in tokens; longer texts are cut from the end.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' is bfloat16 on GPU and float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you trust it.")

    @property
    def backend(self) -> str:
        """The spec's prefix: 'hf', 'embed', 'openai', 'anthropic' or 'ensemble'."""
        return self.model.split(":", 1)[0]

    @property
    def kind(self) -> str:
        """'local' or 'api' (what :attr:`protege.teachers.base.Teacher.kind` of this teacher will be), or
        'ensemble' (no teacher of its own: its members label, and their distributions are combined)."""
        return ENSEMBLE if self.backend == ENSEMBLE else TEACHER_BACKENDS[self.backend]

    @model_validator(mode="after")
    def _api_settings_fit_backend(self) -> TeacherConfig:
        backend = self.model.split(":", 1)[0]
        if backend == "hf" and self.rationale:
            raise ValueError(
                "teacher.rationale needs a teacher that writes its answer ('openai:' or 'anthropic:'); an 'hf:' "
                "teacher scores the labels directly"
            )
        if backend == "anthropic" and self.label_method == "logprobs":
            raise ValueError(
                "Anthropic's API returns no logprobs; set teacher.label_method to 'samples' or 'hard_label'"
            )
        if backend == "anthropic" and "sample_temperature" in self.model_fields_set and self.sample_temperature != 1:
            raise ValueError(
                "Anthropic's Messages API (version 2026-10-21) accepts no temperature; remove teacher.sample_temperature"
            )
        if self.batch_api and backend in ("hf", "embed", "ensemble"):
            raise ValueError("teacher.batch_api applies to API teachers ('openai:' or 'anthropic:')")
        if backend == "embed" and self.rationale:
            raise ValueError("teacher.rationale needs a teacher that writes its answer ('openai:' or 'anthropic:')")
        self._check_select()
        if backend == "ensemble":
            weighting = self.model.split(":", 1)[1]
            if weighting not in ENSEMBLE_WEIGHTINGS:
                raise ValueError(
                    f"teacher {self.model!r}: an ensemble is 'ensemble:mean' or 'ensemble:accuracy', not {weighting!r}"
                )
            if len(self.members) < 2:
                raise ValueError("an ensemble teacher needs at least two teacher.members (each a teacher section)")
        elif self.members:
            raise ValueError(
                f"teacher.members lists the teachers of an ensemble; teacher {self.model!r} is not one (set "
                "teacher.model: ensemble:mean, or remove teacher.members)"
            )
        return self

    def _check_select(self) -> None:
        if self.select == "all":
            wrong = [n for n in _SELECT_SETTINGS if n in self.model_fields_set and getattr(self, n) !=
                     type(self).model_fields[n].default]
            if wrong:
                raise ValueError(
                    f"teacher.{wrong[0]} configures selective labeling, which is off (teacher.select: all labels every "
                    "text); set teacher.select: uncertainty (or random), or remove it"
                )
            return
        if self.select_max_rows is None and self.budget_usd is None and self.select_target is None:
            raise ValueError(
                f"teacher.select: {self.select} labels in rounds until a limit, and none is set, so it would label "
                "every text; set teacher.select_max_rows, teacher.budget_usd or teacher.select_target (or "
                "teacher.select: all)"
            )
        if self.select_max_rows is not None and self.select_seed_rows > self.select_max_rows and \
                self.select_seed_rows != type(self).model_fields["select_seed_rows"].default:  # the default is cut
            raise ValueError(
                f"teacher.select_seed_rows {self.select_seed_rows} is more than teacher.select_max_rows "
                f"{self.select_max_rows}; lower the seed slice or raise the cap"
            )
        for name in ("select_metric", "select_random_share", "select_diversity"):
            if self.select == "random" and name in self.model_fields_set and \
                    getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"teacher.{name} applies to teacher.select: uncertainty; remove it")
        if self.select_target is None and "select_check_rows" in self.model_fields_set and \
                self.select_check_rows != type(self).model_fields["select_check_rows"].default:
            raise ValueError("teacher.select_check_rows is the slice teacher.select_target is checked on; set "
                             "teacher.select_target, or remove it")
        if self.batch_api:
            raise ValueError(
                "teacher.select labels in rounds, each waiting for a student trained on the last, and a provider "
                "batch can take 24 hours; set teacher.batch_api: false, or teacher.select: all"
            )

    @field_validator("members", mode="before")
    @classmethod
    def _members_flat(cls, v: Any) -> Any:
        for m in v if isinstance(v, list) else []:
            model = m.get("model", "") if isinstance(m, dict) else getattr(m, "model", "")
            if str(model).startswith("ensemble:"):
                raise ValueError("teacher.members cannot themselves be ensembles; list their members directly")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            # Never echo the value: it may be a key pasted in by mistake.
            raise ValueError(
                "api_key_env must be the NAME of an environment variable (like OPENAI_API_KEY), not a key; "
                "export the key in that variable"
            )
        return v

    @field_validator("model")
    @classmethod
    def _known_prefix(cls, v: str) -> str:
        prefix = v.split(":", 1)[0]
        if ":" not in v or (prefix not in TEACHER_BACKENDS and prefix != ENSEMBLE):
            known = ", ".join(f"'{p}:'" for p in (*TEACHER_BACKENDS, ENSEMBLE))
            raise ValueError(f"teacher {v!r} has no known prefix; start it with one of {known}")
        return v


# the settings of selective labeling besides teacher.select itself
_SELECT_SETTINGS = ("select_metric", "select_seed_rows", "select_round_rows", "select_random_share",
                    "select_diversity", "select_student_labels", "select_max_rows", "select_target",
                    "select_check_rows")


class StudentConfig(_Section):
    """The small model the user will own."""

    model: str = Field(
        "all-minilm-l6-v2",
        description="Hub id, local directory or packaged name (all-minilm-l6-v2) of an encoder. With "
        "init: scratch only its tokenizer is used.",
    )
    init: Literal["pretrained", "scratch", "teacher_layers"] = Field(
        "pretrained",
        description="'pretrained': start from the model's weights; 'scratch': a new small model; "
        "'teacher_layers' ('hf:' teacher: a causal LM for generation, an encoder classifier for classification): a "
        "copy of the teacher keeping some of its layers, initialised from its weights (as DistilBERT was).",
    )
    keep_layers: list[int] | None = Field(
        None,
        description="teacher_layers: which teacher layers to keep, by index from 0. Default: every "
        "layer_stride-th layer from the first, plus the last.",
    )
    layer_stride: int = Field(3, gt=0, description="teacher_layers: keep every n-th teacher layer (default 3).")
    lora_r: int | None = Field(
        None, gt=0, description="LoRA rank (through peft); unset: full fine-tuning. Causal LM students only."
    )
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: list[str] | None = Field(
        None, description="Module names LoRA adapts; default: every linear layer but the LM head."
    )
    architecture: Literal["bert", "bilstm"] = Field(
        "bert",
        description="Scratch classifiers: 'bert', a small BERT encoder (num_layers, num_heads, pooling); 'bilstm', "
        "Tang et al.'s student: a forward and a backward LSTM over the word embeddings, the mean and max of their "
        "states, a ReLU layer of intermediate_size (default hidden_size) and the head. hidden_size is the width "
        "of its word embeddings and of each LSTM. Saved as model type protege-bilstm.",
    )
    hidden_size: int = Field(128, gt=0, description="Scratch only: width of the encoder.")
    num_layers: int = Field(2, gt=0, description="Scratch only: transformer layers.")
    num_heads: int = Field(2, gt=0, description="Scratch only: attention heads (must divide hidden_size).")
    intermediate_size: int | None = Field(None, gt=0, description="Scratch only: MLP width; default 4 × hidden.")
    dropout: float = Field(
        0.1, ge=0, lt=1, description="Scratch only: dropout on the embeddings, attention probabilities, every "
        "layer's outputs and before the head (BERT's hidden and attention dropout; BERT's 0.1 by default).",
    )
    embeddings: Literal["random", "projected", "distilled"] = Field(
        "random",
        description="Scratch only: 'random' embeddings; 'projected': student.model's pretrained word and "
        "position embeddings projected to hidden_size by PCA (its principal directions), so a small student starts "
        "knowing which words are alike; 'distilled': each word piece run alone through the pretrained encoder "
        "(as Model2Vec does) and its output projected the same way, so each word starts with what the whole "
        "encoder makes of it. Its vocabulary is the tokenizer's, so no word is lost.",
    )
    embeddings_from: Literal["model", "teacher"] = Field(
        "model",
        description="Where projected or distilled embeddings come from: 'model' (student.model) or 'teacher' (the "
        "recipe's 'hf:' encoder teacher, a fine-tuned classifier whose outputs already know the task; it must use "
        "student.model's vocabulary).",
    )
    pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="Scratch classifiers only: what the head reads, the first token's last state ('cls', BERT's "
        "pooler) or the mean of all the text's tokens' last states ('mean'; better for one- or two-layer students, "
        "see BENCHMARKS.md). A 'mean' student is saved as model type protege-bert.",
    )
    ngram_buckets: int = Field(
        0,
        ge=0,
        description="Mean-pooled scratch classifiers: give the student a second, linear member, a bag of its word "
        "pieces and of hashed pairs of neighbouring pieces with this many rows in all (more than the vocabulary: "
        "the pieces take the first rows), trained apart on the same teacher labels; the student answers with the "
        "two members' mixture, the bag's share chosen on training.select_fraction's held-out slice. Costs rows x "
        "labels parameters. 0: off.",
    )
    ngram_lr: float = Field(
        0.1, gt=0, description="Learning rate of the n-gram bag (a linear model from zero wants far more than the "
        "encoder's).",
    )
    embedding_lr: float | None = Field(
        None,
        ge=0,
        description="Classifier students: learning rate of the word-embedding table (the model's input "
        "embeddings). 0 keeps the table as initialised (frozen): the projected or distilled embeddings keep their "
        "geometry for words the training texts never use. null: training.learning_rate, as every other weight.",
    )
    max_length: int = Field(
        128, gt=8, description="Longest input in tokens (prompt plus answer for generation); longer is truncated."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> StudentConfig:
        if self.architecture == "bilstm":
            if self.init != "scratch":
                raise ValueError(f"student.architecture bilstm builds a new student, so it needs student.init scratch "
                                 f"(init is {self.init!r}); set student.init scratch, or remove student.architecture")
            return self  # the BERT settings it would ignore are refused with the others (_refuse_unused)
        if self.init == "scratch" and self.hidden_size % self.num_heads:
            raise ValueError(
                f"student.hidden_size {self.hidden_size} is not divisible by student.num_heads {self.num_heads}; "
                "pick a head count that divides it"
            )
        if self.ngram_buckets and (self.init != "scratch" or self.pooling != "mean"):
            raise ValueError(
                f"student.ngram_buckets adds a member to a mean-pooled scratch classifier (init is {self.init!r}, "
                f"pooling {self.pooling!r}); set student.init scratch and student.pooling mean, or remove it"
            )
        if self.pooling != "cls" and self.init != "scratch":
            raise ValueError(
                f"student.pooling {self.pooling!r} builds a new BERT classifier, so it needs student.init scratch "
                f"(init is {self.init!r}, whose head reads what its model was trained to read); set student.pooling "
                "cls or student.init scratch"
            )
        return self


class TrainingConfig(_Section):
    """L = (1 - alpha) * CE(y, student) + alpha * tau^2 * KL(teacher^tau || student^tau)."""

    alpha: float = Field(0.9, ge=0.0, le=1.0, description="Weight of the distillation term (0 = hard labels only).")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature tau for both distributions in the KL.")
    epochs: int = Field(5, gt=0, description="Passes over the training data.")
    learning_rate: float | None = Field(
        None, gt=0.0, description="Peak AdamW learning rate. Default: 5e-5 for pretrained students, 1e-3 for scratch."
    )
    batch_size: int = Field(
        32, gt=0, description="Examples per optimizer step, over all processes and accumulated micro-batches."
    )
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps with linear warm-up.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(
        1.0,
        gt=0.0,
        description="Clip each optimizer step's gradient to this total L2 norm (over all parameters, after every "
        "micro-batch and process) before the step, as transformers' Trainer and TRL do by default; null: no "
        "clipping. A scratch "
        "student at a high learning rate sees single steps with tens of times its usual gradient as it leaves its "
        "starting plateau; the training log's grad_norm is the norm before clipping.",
    )
    seed: int = Field(0, description="Seed for the split, initialisation and data order.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches each optimizer step's batch_size is split into (less memory, same result)."
    )
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    checkpoint_every: int | None = Field(
        None, gt=0, description="Save a resumable checkpoint every K optimizer steps; a rerun after a kill continues "
        "from the last one."
    )
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(
        default_factory=list,
        description="Experiment trackers (one or a list; 'none': none) that get every optimizer step's loss, "
        "kd_loss, ce_loss, lr and throughput, and the selection slice's scores: tensorboard (under "
        "<output_dir>/runs/<student dir>), wandb, trackio. Each needs its package installed.",
    )
    # classifier students ------------------------------------------------------------------------------------
    select_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="Classification: share of the teacher-labelled training rows held out (never trained on) to "
        "pick the checkpoint that agrees with the teacher best, with no gold label (0: keep the last step).",
    )
    select_metric: Literal["kl", "agreement"] = Field(
        "kl",
        description="How checkpoints are compared on that slice: mean KL(teacher || student) (lower is better), or "
        "agreement with the teacher's top label (higher is better; ties go to the lower KL).",
    )
    select_rows: Literal["original", "all"] = Field(
        "original",
        description="Which held-out rows the selection slice scores: 'original' (the held-out training rows) or "
        "'all' (with the data.augment texts made from them, which never train either): more rows, and texts the "
        "teacher gives its own reading of, where a teacher fine-tuned on the training texts answers those from "
        "memory.",
    )
    eval_every: int | None = Field(
        None, gt=0, description="Optimizer steps between checkpoint evaluations on the selection slice; default "
        "once per epoch (about)."
    )
    patience: int | None = Field(
        None, gt=0, description="Stop when this many evaluations in a row did not improve (unset: train to the end)."
    )
    hidden_weight: float = Field(
        0.0,
        ge=0.0,
        description="Classification with a local encoder teacher ('hf:' sequence classifier, 'embed:' sentence "
        "encoder) that reads the student's word pieces: "
        "weight of a hidden-state term, 1 - cosine between each token's last state of the student (mapped to the "
        "teacher's width by a linear map trained with it, not saved) and the teacher's, averaged over the text, "
        "added per training row that has the teacher's states (training.hidden_rows). 0: off.",
    )
    hidden_rows: Literal["original", "all"] = Field(
        "original",
        description="Which training rows training.hidden_weight gets the teacher's states for, once, at the start of "
        "training (held in memory, float16, tokens x width per row): 'original' (the texts as given; augmented "
        "ones train on the teacher's labels alone) or 'all' (a teacher pass over every augmented text too: as "
        "long as labelling them again).",
    )
    ema_decay: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Classification: keep an exponential moving average of the student's weights (Polyak "
        "averaging, decay per optimizer step; 0.998 averages about the last 500 steps) and use it in place of the "
        "raw weights: it is what the selection slice scores and what is saved. Unset: the raw weights.",
    )
    sweep_alpha: list[float] | None = Field(
        None,
        description="Classification: alphas to try; each (alpha, temperature) pair trains a student, the one best on "
        "the selection slice (training.select_fraction > 0) is kept, and the table goes into the report.",
    )
    sweep_temperature: list[float] | None = Field(
        None, description="Temperatures to try with training.sweep_alpha (each list defaults to the single setting)."
    )
    use_gold: bool = Field(
        True,
        description="Classification: hard target y is the gold label where a training row has one (else the "
        "teacher's top label). false: learn from the teacher alone, as with unlabeled data.",
    )
    hard_label_baseline: bool = Field(
        True, description="Classification: also train a same-size student on hard labels only (alpha=0), for the "
        "report."
    )
    # language-model students -------------------------------------------------------------------------------
    distill: Literal["sequence", "logits", "topk", "on_policy"] = Field(
        "sequence",
        description="Generation: 'sequence' (train on the teacher's text), 'logits' (token-level KD from the local "
        "'hf:' teacher's full distribution, same tokenizer), 'topk' (token-level KD from the stored top-k "
        "logprobs of any teacher that returned them, the rest as a tail bucket), 'on_policy' (GKD: the student "
        "samples replies to the prompts and learns the local 'hf:' teacher's full distribution on its own tokens, "
        "or a served teacher's top-k there (teacher.provider 'vllm' or 'llamacpp'), same tokenizer; see "
        "on_policy_fraction).",
    )
    soft_loss: Literal["kl", "logit_mse"] = Field(
        "kl",
        description="Classification: the soft term of the loss. 'kl': tau^2 KL(teacher^tau || student^tau) (Hinton "
        "et al.). 'logit_mse': squared distance of the student's logits to the teacher's log-probabilities, both "
        "centred (Tang et al. 2019's choice for small students of BERT; temperature unused).",
    )
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl",
        description="distill 'logits' and 'on_policy': forward KL(teacher || student), reverse KL(student || "
        "teacher), or the generalized Jensen-Shannon divergence with jsd_beta. Default forward KL for 'logits', "
        "reverse KL for 'on_policy' (GKD). 'topk' uses forward KL.",
    )
    on_policy_fraction: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="distill 'on_policy': GKD's lambda, the share of optimizer steps whose replies the student "
        "samples itself (pure divergence on its tokens); the other steps learn as 'logits' does, (1 - alpha) CE + "
        "alpha tau^2 D on the teacher's own replies. Which steps are which is fixed by training.seed.",
    )
    on_policy_temperature: float = Field(
        1.0, gt=0.0, description="distill 'on_policy': temperature the student samples its replies at (1: its own "
        "distribution)."
    )
    on_policy_max_tokens: int = Field(
        64, gt=0, description="distill 'on_policy': most tokens the student writes per sampled reply (it stops "
        "earlier at its end token); below student.max_length, prompts are cut from their start to leave room."
    )
    jsd_beta: float = Field(
        0.5, ge=0.0, le=1.0, description="divergence 'jsd': interpolation of the generalized JSD (see losses)."
    )
    rationale_weight: float = Field(
        0.0,
        ge=0.0,
        description="Generation with answer_format 'rationale': weight of a second target, the teacher's "
        "explanation behind an '[explain]' prefix, next to the '[answer]' target (distilling step-by-step). "
        "0: train on the answer alone.",
    )
    loss_chunk_size: int = Field(
        1024, gt=0, description="Generation: tokens per chunk of the LM-head loss; all logits are never held at once."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers_as_list(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) or v is None else v
        if not isinstance(v, list):
            return v
        names = list(dict.fromkeys(n for n in v if n not in ("none", None)))  # in order, once each
        if names and any(n in ("none", None) for n in v):
            raise ValueError("'none' turns tracking off; list trackers, or 'none' alone")
        return names

    @model_validator(mode="after")
    def _selection_needs_slice(self) -> TrainingConfig:
        if self.select_fraction == 0:
            needs = [n for n in ("sweep_alpha", "sweep_temperature", "patience") if getattr(self, n) is not None]
            needs += ["select_rows"] if self.select_rows != "original" else []
            if needs:
                raise ValueError(
                    f"training.{needs[0]} compares students on a held-out slice of the teacher-labelled training rows; "
                    "set training.select_fraction (for example 0.1)"
                )
        for name in ("sweep_alpha", "sweep_temperature"):
            grid = getattr(self, name)
            if grid is not None and not grid:
                raise ValueError(f"training.{name} is empty; list at least one value, or remove it")
        if self.sweep_alpha and any(not 0 <= a <= 1 for a in self.sweep_alpha):
            raise ValueError(f"training.sweep_alpha {self.sweep_alpha}: every alpha is in [0, 1]")
        if self.sweep_temperature and any(t <= 0 for t in self.sweep_temperature):
            raise ValueError(f"training.sweep_temperature {self.sweep_temperature}: every temperature is above 0")
        if self.soft_loss == "logit_mse" and self.sweep_temperature:
            raise ValueError(
                "training.sweep_temperature: training.soft_loss logit_mse matches logits, with no temperature, so "
                "every temperature would train the same student; remove it, or set training.soft_loss kl"
            )
        return self


class EvalConfig(_Section):
    """How the student is compared with the teacher."""

    latency_samples: int = Field(32, gt=0, description="Examples timed one by one for p50/p95 latency.")
    calibration_bins: int = Field(10, gt=1, description="Bins of the expected calibration error.")
    compute_usd_per_hour: float = Field(
        0.10,
        ge=0.0,
        description="Price of an hour of this machine, to turn measured compute time of local models into money.",
    )
    cascade_sweep: bool = Field(
        True,
        description="Sweep the cascade's threshold (the student answers when its confidence, a classifier's top "
        "label probability or an LM's geometric mean token probability, is at least it; the teacher otherwise) over "
        "the held-out split: quality and cost per 1,000 requests, plots/cascade.png, the report's cascade section. "
        "Uses answers already made; no teacher calls.",
    )
    keep_fraction: float = Field(
        0.95, gt=0.0, le=1.0,
        description="The cascade sweep marks the cheapest threshold that keeps this share of the teacher's accuracy.",
    )


class Recipe(_Section):
    """One distillation run, from data to report."""

    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: Path = Field(Path("runs/protege"), description="Where the store, student and report go.")

    @model_validator(mode="after")
    def _sections_agree(self) -> Recipe:
        backend = self.teacher.model.split(":", 1)[0]
        s, t = self.student, self.training
        # generation: the default student is the teacher with a third of its layers, when there is one to cut
        if self.task.kind == "generation" and "model" not in s.model_fields_set and "init" not in s.model_fields_set \
                and backend == "hf":
            s.init = "teacher_layers"
        # on-policy distillation defaults to reverse KL (GKD): the student is judged on its own samples
        if self.task.kind == "generation" and t.distill == "on_policy" and "divergence" not in t.model_fields_set:
            t.divergence = "reverse_kl"
        _refuse_unused(self)
        if self.teacher.select != "all" and (self.data.augment.per_text or self.data.augment.paraphrase):
            raise ValueError(
                f"teacher.select: {self.teacher.select} labels a chosen part of the training texts, and "
                "data.augment makes new texts from all of them; turn one off (data.augment.per_text: 0 and "
                "paraphrase: false, or teacher.select: all)"
            )
        if self.task.kind == "classification":
            if s.ngram_buckets and not t.select_fraction:
                raise ValueError(
                    "student.ngram_buckets chooses how much the n-gram bag counts on a held-out slice of the "
                    "teacher-labelled training rows; set training.select_fraction (for example 0.1)"
                )
            if s.init == "teacher_layers" and backend != "hf":
                raise ValueError(
                    "student.init teacher_layers copies layers of a local encoder teacher ('hf:' and a sequence "
                    f"classifier); teacher {self.teacher.model!r} has no layers to copy. Use student.init pretrained or "
                    "scratch"
                )
            if t.hidden_weight and s.architecture == "bilstm":
                raise ValueError(
                    "training.hidden_weight matches a BERT student's token states to the teacher's; a student.architecture "
                    "bilstm student has LSTM states of another kind. Set training.hidden_weight: 0, or "
                    "student.architecture bert"
                )
            if t.hidden_weight and backend not in ("hf", "embed"):
                raise ValueError(
                    f"training.hidden_weight matches the student's token states to a local encoder teacher's ('hf:' "
                    f"sequence classifier or 'embed:' sentence encoder); teacher {self.teacher.model!r} returns no "
                    "states. Set training.hidden_weight: 0, or a local encoder teacher"
                )
            if s.embeddings_from == "teacher" and backend != "hf":
                raise ValueError(
                    f"student.embeddings_from teacher reads the word embeddings of a local encoder teacher ('hf:'); "
                    f"teacher {self.teacher.model!r} has none to read. Set student.embeddings_from: model (the "
                    "student.model's), or an 'hf:' teacher"
                )
            return self
        if backend in ("embed", "ensemble"):
            raise ValueError(
                f"teacher {self.teacher.model!r} scores labels and cannot write answers; a generation task needs an "
                "'hf:' causal LM or an API teacher"
            )
        if self.data.augment.per_text:
            raise ValueError(
                "data.augment makes new texts for a classification task's teacher to label; remove it (generation "
                "tasks learn from the teacher's answers to the prompts given)"
            )
        if s.init == "teacher_layers" and backend != "hf":
            raise ValueError(
                "student.init teacher_layers copies layers of a local teacher; with an API teacher set student.model "
                "to a causal LM (a hub id or a local directory)"
            )
        if s.init != "teacher_layers" and "model" not in s.model_fields_set:
            raise ValueError(
                "a generation task needs a causal language-model student: set student.model (a hub id or a local "
                "directory), or student.init: teacher_layers with an 'hf:' teacher"
            )
        if t.distill == "logits" and backend != "hf":
            raise ValueError(
                "training.distill 'logits' needs the teacher's full distribution at training time, i.e. an 'hf:' "
                "teacher; for an API teacher use 'topk' (stored top-k logprobs) or 'sequence'"
            )
        if t.distill == "on_policy" and backend != "hf":
            if backend != "openai" or (self.teacher.provider or "openai") not in SCORING_PROVIDERS:
                raise ValueError(
                    "training.distill 'on_policy' needs the teacher's log-probabilities on the tokens the student "
                    f"sampled, at training time; teacher {self.teacher.model!r} returns only the top-k of its own "
                    "tokens. Serve the teacher with vLLM or llama.cpp (teacher.provider 'vllm' or 'llamacpp', "
                    "whose completions endpoint scores given tokens), use an 'hf:' teacher with the student's "
                    "tokenizer, or training.distill 'topk' or 'sequence'"
                )
        if t.distill == "on_policy" and t.on_policy_max_tokens >= s.max_length:
            raise ValueError(
                f"training.on_policy_max_tokens {t.on_policy_max_tokens} leaves no room for the prompt in "
                f"student.max_length {s.max_length}; lower it or raise student.max_length"
            )
        if t.distill == "topk" and backend == "anthropic":
            raise ValueError("Anthropic's API returns no logprobs; use training.distill 'sequence'")
        if t.rationale_weight > 0 and self.task.answer_format != "rationale":
            raise ValueError("training.rationale_weight needs task.answer_format: rationale (a rationale to learn)")
        return self

    def resolve_paths(self, base: Path) -> Recipe:
        """Make relative paths absolute against ``base`` (the recipe file's directory)."""
        d = self.model_dump()
        for name in ("path", "eval_path"):
            path = getattr(self.data, name)
            if path is not None and hub_dataset_id(path) is None:  # a Hub id is no path under base
                d["data"][name] = base / path
        d["output_dir"] = base / self.output_dir
        if d["output_dir"].exists() and not d["output_dir"].is_dir():
            raise RecipeError(f"output_dir {str(d['output_dir'])!r} is a file; point it at a directory")
        return build_recipe(d)

    @property
    def store_path(self) -> Path:
        return self.output_dir / "protege.db"

    def section_hash(self, *names: str) -> str:
        """Content hash of some sections, to tell whether an artifact made from them is still current."""
        dump = self.model_dump(mode="json")
        return content_hash({n: dump[n] for n in names})[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def save(self, path: Path) -> None:
        write_text_atomic(path, self.to_yaml())


# -- settings that do nothing for the chosen task ------------------------------------------------------------

_LM = "language-model students (task.kind: generation)"
_TO_GENERATION = "remove it, or set task.kind: generation"
_LORA = (f"configures LoRA, which protege applies to {_LM}", _TO_GENERATION)
_KEEP = "picks the teacher layers a student.init: teacher_layers student keeps"
# setting -> (what it is for, the fix), for the settings only one task kind uses
_GENERATION_ONLY = {
    "student.lora_r": _LORA,
    "student.lora_alpha": _LORA,
    "student.lora_dropout": _LORA,
    "student.lora_target_modules": _LORA,
    "training.distill": (
        f"picks what {_LM} learn from: the teacher's text, logits or top-k, or their own samples the teacher "
        "scores (on_policy)", _TO_GENERATION,
    ),
    "training.rationale_weight": (f"weighs the teacher's explanation as a second target of {_LM}", _TO_GENERATION),
    "training.loss_chunk_size": (
        "chunks a language model's LM-head loss over tokens; a classifier makes one prediction per text",
        _TO_GENERATION,
    ),
    "training.divergence": (
        "picks the token-level divergence of training.distill: logits; a classifier student learns by forward KL "
        "to the teacher's label distribution, at training.temperature",
        _TO_GENERATION,
    ),
    "training.jsd_beta": ("mixes the two sides of training.divergence: jsd, a generation setting", _TO_GENERATION),
    **{f"training.on_policy_{k}": (f"is the {what} of training.distill: on_policy, a generation mode", _TO_GENERATION)
       for k, what in (("fraction", "share of sampled steps"), ("temperature", "sampling temperature"),
                       ("max_tokens", "sample length"))},
}
_ONE_ANSWER = "a generation teacher writes one answer per text"
_PICK = ("picks a classifier student's checkpoint or (alpha, temperature) on held-out teacher-labelled rows; a "
         "language-model student trains to its last step", "remove it")
_CLASSIFICATION_ONLY = {
    "task.labels": (
        "is a classification task's label set; a generation task's answers are free text",
        "remove it (task.metric scores answers against data.label_column)",
    ),
    "teacher.rationale": (
        "asks a classifying API teacher to explain before its label",
        "remove it; for a generation task set task.answer_format: rationale",
    ),
    "teacher.label_method": (f"picks how an API teacher's label distribution is made; {_ONE_ANSWER}", "remove it"),
    "teacher.n_samples": (f"counts the answers sampled for label_method 'samples'; {_ONE_ANSWER}", "remove it"),
    "teacher.sample_temperature": (f"is the temperature of label_method 'samples'; {_ONE_ANSWER}", "remove it"),
    "teacher.calibrate": (
        "calibrates a local teacher's label scores; a generation teacher writes text", "remove it"
    ),
    "teacher.select": (
        "picks the training texts a classifier's teacher labels by how unsure a student trained so far is of them; "
        "a generation student has no label distribution to be unsure with",
        "remove it (teacher.select: all)",
    ),
    "training.select_fraction": _PICK,
    "training.select_metric": _PICK,
    "training.select_rows": _PICK,
    "training.eval_every": _PICK,
    "training.patience": _PICK,
    "training.hidden_weight": ("matches a classifier student's token states to its encoder teacher's; a "
                               "language model distills with training.distill", "remove it"),
    "training.hidden_rows": ("picks the rows of training.hidden_weight, a classifier's term", "remove it"),
    "training.ema_decay": ("averages a classifier student's weights; a language-model student is trained without it",
                           "remove it"),
    "training.sweep_alpha": _PICK,
    "training.sweep_temperature": _PICK,
    "teacher.score_temperature": ("sharpens an 'embed:' teacher's label scores; a generation teacher writes text",
                                  "remove it"),
    "training.use_gold": (
        "picks the hard label a classifier learns; a language-model student learns the teacher's text", "remove it"
    ),
    "training.hard_label_baseline": (
        "trains a second classifier on hard labels for the report; a generation task trains one student", "remove it"
    ),
}
_CLASSIFICATION_ONLY["student.ngram_buckets"] = (
    "adds a bag-of-word-pieces member to a classifier student; a language model's answer is text", "remove it")
_CLASSIFICATION_ONLY["training.soft_loss"] = (
    "picks a classifier's soft loss; a language model distills with training.distill and training.divergence",
    "remove it")
_CLASSIFICATION_ONLY["student.architecture"] = ("builds a classifier student (bert or bilstm); a language model is "
                                                 "student.model's", "remove it")
_CLASSIFICATION_ONLY["student.embedding_lr"] = ("sets a classifier's word-embedding learning rate", "remove it")
_CLASSIFICATION_ONLY["student.ngram_lr"] = ("is the n-gram bag's learning rate (student.ngram_buckets)", "remove it")
_SCRATCH_SIZES = (
    "student.hidden_size", "student.num_layers", "student.num_heads", "student.intermediate_size", "student.dropout",
    "student.embeddings", "student.embeddings_from",
)


def _set_off_default(recipe: Recipe, dotted: Iterable[str]) -> list[str]:
    """The settings among ``dotted`` that were set to something other than their default.

    Set alone is not enough: a saved recipe (the recipe.yaml beside every artifact) writes every setting back,
    so its defaults return as set, and a default does no harm wherever it is.
    """
    out = []
    for name in dotted:
        section_name, field = name.split(".")
        section = getattr(recipe, section_name)
        default = type(section).model_fields[field].get_default(call_default_factory=True)
        if field in section.model_fields_set and getattr(section, field) != default:
            out.append(name)
    return out


def _refuse_unused(recipe: Recipe) -> None:
    """Refuse every setting the user set that the task kind (or another setting) leaves unused, saying what it
    is for and the fix: a setting that validates and then does nothing misleads whoever set it."""
    s, t = recipe.student, recipe.training
    unused: dict[str, tuple[str, str]] = {}
    if recipe.task.kind == "classification":
        unused |= {k: _GENERATION_ONLY[k] for k in _set_off_default(recipe, _GENERATION_ONLY)}
    else:
        if s.init == "scratch":
            unused["student.init: scratch"] = (
                "builds a new small encoder; a language-model student starts from pretrained weights",
                "set student.model to a causal LM, or student.init: teacher_layers with an 'hf:' teacher",
            )
        unused |= {k: _CLASSIFICATION_ONLY[k] for k in _set_off_default(recipe, _CLASSIFICATION_ONLY)}
        if s.lora_r is None:
            for k in _set_off_default(recipe, ("student.lora_alpha", "student.lora_dropout", "student.lora_target_modules")):
                unused[k] = ("configures LoRA, which is off until student.lora_r (the rank) is set",
                             "remove it, or set student.lora_r")
        if t.distill not in ("logits", "on_policy") and _set_off_default(recipe, ("training.divergence",)):
            unused["training.divergence"] = (
                "picks the divergence of training.distill: logits or on_policy ('topk' uses forward KL over the "
                "stored top-k, 'sequence' cross-entropy on the teacher's text)",
                "remove it, or set training.distill: logits",
            )
        elif t.divergence != "jsd" and _set_off_default(recipe, ("training.jsd_beta",)):
            unused["training.jsd_beta"] = ("mixes the two sides of training.divergence: jsd",
                                           "remove it, or set training.divergence: jsd")
        if t.distill != "on_policy":
            for k in _set_off_default(recipe, ("training.on_policy_fraction", "training.on_policy_temperature",
                                               "training.on_policy_max_tokens")):
                unused[k] = ("configures the student's own samples of training.distill: on_policy",
                             "remove it, or set training.distill: on_policy")
        elif t.on_policy_fraction == 1.0 and _set_off_default(recipe, ("training.alpha",)):
            unused["training.alpha"] = (
                "weighs CE against the divergence on the teacher's replies; with training.on_policy_fraction 1 "
                "every step learns the divergence alone on the student's own samples",
                "remove it, or set training.on_policy_fraction below 1 to mix in the teacher's replies",
            )
    if s.init != "teacher_layers":
        for k in _set_off_default(recipe, ("student.keep_layers", "student.layer_stride")):
            unused[k] = (_KEEP, "remove it, or set student.init: teacher_layers")
    if s.init == "scratch" and s.embeddings == "random":
        for k in _set_off_default(recipe, ("student.embeddings_from",)):
            unused[k] = ("names where projected or distilled embeddings come from; random embeddings come from "
                         "nowhere", "remove it, or set student.embeddings: projected or distilled")
    if s.architecture == "bilstm":
        for k in _set_off_default(recipe, ("student.num_layers", "student.num_heads", "student.pooling",
                                           "student.ngram_buckets")):
            if not (k == "student.num_layers" and s.num_layers == 1):  # one LSTM each way: one layer
                unused[k] = ("shapes a BERT student; student.architecture bilstm has one LSTM each way and pools the "
                             "mean and max of their states", "remove it, or set student.architecture bert")
    if recipe.training.soft_loss == "logit_mse":
        for k in _set_off_default(recipe, ("training.temperature",)):
            unused[k] = ("tempers the KL; training.soft_loss logit_mse matches logits, with no temperature",
                         "remove it, or set training.soft_loss kl")
    if s.init != "scratch":
        for k in _set_off_default(recipe, _SCRATCH_SIZES):
            unused.setdefault(k, ("shapes a student.init: scratch encoder; any other student has its model's own",
                                  "remove it, or set student.init: scratch"))
    if unused:
        lines = "".join(f"\n    {k} {why}. Fix: {fix}." for k, (why, fix) in unused.items())
        raise ValueError(f"in a {recipe.task.kind} task these settings would be ignored, so they are refused:{lines}")


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, 'training.alpha', 0.7)`` sets ``d['training']['alpha'] = 0.7``."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = d.setdefault(p, {})
        if not isinstance(child, dict):
            raise RecipeError(f"cannot set {dotted!r}: {p!r} is not a section")
        d = child
    d[leaf] = value


def build_recipe(data: dict[str, Any], source: str = "recipe", lines: dict[str, int] | None = None) -> Recipe:
    """Validate a recipe dict; errors name the field (and YAML line), what is wrong, and the fix."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            where = f"{source}:{lines[loc]}" if lines and loc in lines else source
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown setting; check its spelling (see `protege run --help` for every setting)"
                if re.search(r"api_?key|secret|password|_key$|\.key$", loc.lower()):
                    msg = (
                        "secrets never go in a recipe; export the API key in an environment variable and name "
                        "that variable in teacher.api_key_env"
                    )
            got = err.get("input")
            secret = loc.endswith("api_key_env")  # never echo what may be a pasted key
            shown = (
                ""
                if secret or err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict)
                else f" (got {got!r})"
            )
            msgs.append(f"{where}: {loc or '(top level)'}: {msg}{shown}")
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(msgs)) from None


def _yaml_lines(text: str) -> dict[str, int]:
    """Map dotted keys to their 1-based line in the YAML text, for error messages."""
    out: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                out[key] = k.start_mark.line + 1
                walk(v, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[f"{prefix}{i}"] = v.start_mark.line + 1
                walk(v, f"{prefix}{i}.")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out
    if root is not None:
        walk(root, "")
    return out


_PATH_SETTINGS = ("output_dir", "data.path", "data.eval_path")  # an override of these is relative to the caller


def load_recipe(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, override and validate a recipe; with no path, the defaults (relative to the working directory).

    Relative paths in the file are relative to the file's directory; relative paths in ``overrides`` (output_dir,
    data.path, data.eval_path) to the working directory, as a command line's are."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    base = Path.cwd()
    source = "recipe"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {source!r} does not exist; check the path")
        text = path.read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise RecipeError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{source}: a recipe is a YAML mapping of sections (task, data, teacher, ...)")
        data, lines, base = loaded, _yaml_lines(text), path.resolve().parent
    for key, value in (overrides or {}).items():
        if key in _PATH_SETTINGS and isinstance(value, (str, Path)) and hub_dataset_id(str(value)) is None:
            # a path given here (a command-line flag) is the caller's, relative to where they are, not to the
            # recipe file's directory as the file's own paths are
            value = str(Path.cwd() / value)
        set_dotted(data, key, value)
    return build_recipe(data, source, lines).resolve_paths(base)


def leaf_fields(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, Any]]:
    """Every setting as (dotted name, FieldInfo), for generating CLI flags."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, _Section) and ann is not Label:
            out += leaf_fields(ann, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", info))
    return out
