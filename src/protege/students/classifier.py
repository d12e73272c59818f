"""Students: a Hugging Face encoder with a classification head: pretrained, configured from scratch, or cut
from a local encoder teacher.

A ``teacher_layers`` student is a copy of an 'hf:' sequence-classifier teacher (a fine-tuned BERT, MiniLM ...)
that keeps some of its encoder layers with their weights, as DistilBERT was made from BERT: the embeddings,
every ``layer_stride``-th layer from the first plus the last (or ``keep_layers``), the pooler and the head, whose
rows are put in the task's label order. It uses the teacher's tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ProtegeError
from ..recipe import StudentConfig, TeacherConfig
from ..sources import resolve_source
from .card import StudentCard
from .lm import default_keep_layers

__all__ = [
    "build_student",
    "count_parameters",
    "keep_encoder_layers",
    "label_order",
    "load_student",
    "load_teacher_classifier",
    "register_students",
    "save_student",
    "scratch_init_std",
]


def build_student(
    cfg: StudentConfig, labels: tuple[str, ...], seed: int, teacher: TeacherConfig | None = None
) -> tuple[Any, Any, list[int] | None]:
    """(model, tokenizer, the teacher layers it kept or None) of a new student whose head predicts ``labels`` in
    order; ``teacher`` is the recipe's, which an ``init: teacher_layers`` student is cut from."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    from .mean_pool import MeanPoolBertConfig, MeanPoolBertForSequenceClassification

    label_kw: dict[str, Any] = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {x: i for i, x in enumerate(labels)},
    }
    if cfg.init == "teacher_layers":
        if teacher is None or not teacher.model.startswith("hf:"):
            raise ProtegeError(
                "student.init teacher_layers copies layers of a local encoder teacher ('hf:' and a sequence "
                "classifier); set teacher.model to one, or use student.init pretrained or scratch"
            )
        model, tokenizer = load_teacher_classifier(teacher)
        order = label_order(model.config.id2label, labels, teacher.model)
        _reorder_head(model, order)
        for k, v in label_kw.items():
            setattr(model.config, k, v)
        n = model.config.num_hidden_layers
        keep = cfg.keep_layers if cfg.keep_layers is not None else default_keep_layers(n, cfg.layer_stride)
        return keep_encoder_layers(model, keep), tokenizer, list(keep)

    source = resolve_source(cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **source.kwargs())
    except OSError as e:
        raise ProtegeError(f"cannot load the student's tokenizer from {cfg.model!r}: {e}") from None
    torch.manual_seed(seed)  # the new head (and a scratch model) start the same way every run
    if cfg.init == "scratch" and cfg.architecture == "bilstm":
        from .bilstm import BiLstmConfig, BiLstmForSequenceClassification

        register_students()  # so that save_pretrained writes bilstm.py and its auto_map beside the student
        tokenizer.padding_side = "right"  # the backward LSTM reverses each text within its length: text first
        model = BiLstmForSequenceClassification(BiLstmConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, head_size=cfg.intermediate_size or cfg.hidden_size,
            dropout=cfg.dropout, pad_token_id=tokenizer.pad_token_id or 0, **label_kw,
        ))
    elif cfg.init == "scratch":
        register_students()  # so that save_pretrained writes mean_pool.py and its auto_map beside a protege-bert
        mean_kw = {"ngram_buckets": cfg.ngram_buckets} if cfg.pooling == "mean" else {}
        config = (MeanPoolBertConfig if cfg.pooling == "mean" else BertConfig)(
            **mean_kw,
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            initializer_range=scratch_init_std(cfg.hidden_size),
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            max_position_embeddings=max(512, cfg.max_length),
            pad_token_id=tokenizer.pad_token_id or 0,
            **label_kw,
        )
        model = (MeanPoolBertForSequenceClassification if cfg.pooling == "mean" else BertForSequenceClassification)(
            config
        )
    else:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source.name_or_path, ignore_mismatched_sizes=True, **label_kw, **source.kwargs()
            )
        except OSError as e:
            raise ProtegeError(f"cannot load the student model {cfg.model!r}: {e}") from None
        return model, tokenizer, None
    if cfg.embeddings != "random":
        project_embeddings(model, source, cfg.model, distilled=cfg.embeddings == "distilled",
                           teacher=teacher if cfg.embeddings_from == "teacher" else None, tokenizer=tokenizer)
    return model, tokenizer, None


def register_students() -> None:
    """Let the Auto classes load protege's own student types (protege-bert, protege-bilstm)."""
    from .bilstm import register as register_bilstm
    from .mean_pool import register as register_mean_pool

    register_mean_pool()
    register_bilstm()


def scratch_init_std(hidden_size: int) -> float:
    """The standard deviation a scratch student's weights start at: 1 / sqrt(hidden_size), so a layer's linear
    maps neither shrink nor grow what goes through them.

    BERT's own 0.02 is for its width of 768. At a student's width it starves the layers: at hidden 64 an attention
    block (value, then output projection) carries 0.02^2 * 64 = 2.6% of its input, so the [CLS] state the classifier
    reads is nearly the same for every text, the gradient that would make it differ is as small, and a student
    can spend its whole training predicting the majority label (benchmarks/active.py's SST-2 student, hidden 64 at
    lr 3e-3, did so in several of its rounds, which ones decided by the data order). At 1 / sqrt(hidden_size) that
    share is 1, and the same trainings left the plateau within their first three epochs of five.
    """
    return hidden_size**-0.5


def project_embeddings(model: Any, source: Any, name: str, *, distilled: bool = False,
                       teacher: TeacherConfig | None = None, tokenizer: Any = None) -> dict[str, float]:
    """Set a scratch BERT's word, position and token-type embeddings from a pretrained encoder's, projected onto
    their top ``hidden_size`` principal directions. The encoder is ``source`` (the model the student's tokenizer
    came from, named ``name``), or with ``teacher`` that 'hf:' encoder classifier, which must share the
    ``tokenizer``'s vocabulary.

    With W the pretrained word embeddings (V x D) and mu their mean row, the top principal directions P (D x h)
    of W - mu give the student's words (W - mu) P, and positions and token types E P (their sum is what the
    encoder's first LayerNorm sees, so one linear map keeps their geometry together). Each is scaled by the same
    factor, so the words' standard deviation is the student config's ``initializer_range`` (the scale its other
    weights start at).

    ``distilled`` takes the words from the whole encoder instead, as Model2Vec does: each word piece alone
    between the tokenizer's start and end tokens goes through it, and the mean of its output states is that
    word's row of W, projected the same way (positions and token types as above, through the input embeddings'
    own map). A word then starts with what the encoder makes of it in context of nothing, which for a
    fine-tuned teacher includes what it means for the task. Returns the share of the words' variance the
    projection keeps."""
    import torch

    if distilled and tokenizer is None:
        raise ValueError("project_embeddings(distilled=True) needs the student's tokenizer: each word piece goes "
                         "through the encoder between its start and end tokens")
    base = _embedding_source(source, name, teacher, tokenizer)
    emb, new = base.get_input_embeddings().weight.detach(), model.get_input_embeddings().weight
    h = new.shape[1]
    if emb.shape[0] != new.shape[0] or emb.shape[1] < h:
        who = f"teacher {teacher.model!r}" if teacher is not None else f"student.model {name!r}"
        raise ProtegeError(
            f"student.embeddings {'distilled' if distilled else 'projected'}: {who} has {emb.shape[0]} word "
            f"embeddings of width {emb.shape[1]}; the student needs {new.shape[0]} of width at most that "
            f"(student.hidden_size {h})"
        )
    proj, kept, centred = _principal(emb, h)
    scale = model.config.initializer_range / float((centred @ proj).std())
    if distilled:
        where = teacher.model.split(":", 1)[1] if teacher is not None else str(source.name_or_path)
        key = (where, _mtime(where), emb.shape[0])
        if key not in _WORD_OUTPUTS:  # the hard-label twin and a sweep's students build the same table
            _WORD_OUTPUTS.clear()
            _WORD_OUTPUTS[key] = _word_outputs(base, tokenizer, emb.shape[0])
        out = _WORD_OUTPUTS[key]
        wproj, kept, wcentred = _principal(out, h)
        words = wcentred @ wproj
        words = words * (model.config.initializer_range / float(words.std()))
    else:
        words = centred @ proj * scale
    with torch.no_grad():
        new.copy_(words)
        for attr in ("position_embeddings", "token_type_embeddings"):  # a BERT student's; a BiLSTM has none
            theirs = getattr(getattr(base, "embeddings", None), attr, None)
            ours = getattr(getattr(getattr(model, "bert", None), "embeddings", None), attr, None)
            if theirs is not None and ours is not None:
                n = min(theirs.weight.shape[0], ours.weight.shape[0])
                ours.weight[:n] = theirs.weight[:n].detach() @ proj * scale
    return {"variance_kept": kept}


_WORD_OUTPUTS: dict[tuple, Any] = {}  # the last encoder's per-word outputs: (where, its mtime, vocab) -> table


def _mtime(where: str) -> float | None:
    """When a local model directory last changed (a model fine-tuned again in the same process is read again);
    None for a hub id."""
    path = Path(where)
    return max((f.stat().st_mtime for f in path.iterdir()), default=None) if path.is_dir() else None


def _principal(x: Any, h: int) -> tuple[Any, float, Any]:
    """(top ``h`` principal directions of the rows of ``x`` as a D x h matrix, the share of variance they keep,
    x minus its mean row). pca_lowrank's random start is seeded, so the directions are the same every run and
    the caller's random state is left as it was."""
    import torch

    centred = x - x.mean(0, keepdim=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _, s, v = torch.pca_lowrank(centred, q=min(h + 8, x.shape[1]), center=False, niter=4)
    return v[:, :h], float((s[:h] ** 2).sum() / (centred**2).sum()), centred


def _embedding_source(source: Any, name: str, teacher: TeacherConfig | None, tokenizer: Any) -> Any:
    """The pretrained encoder (a transformers base model, float32, eval mode) whose embeddings a scratch
    student starts from: student.model's, or the 'hf:' teacher's when ``teacher`` is given."""
    import torch
    from transformers import AutoModel

    if teacher is not None:
        model, their_tok = load_teacher_classifier(teacher, "student.embeddings_from teacher reads its words",
                                                   "Set student.embeddings_from: model")
        if tokenizer is not None and their_tok.get_vocab() != tokenizer.get_vocab():
            raise ProtegeError(
                f"student.embeddings_from teacher: teacher {teacher.model!r} does not use student.model {name!r}'s "
                "vocabulary, so its word embeddings are not the student's words. Set student.model to the teacher's "
                "tokenizer (its directory), or student.embeddings_from: model"
            )
        return model.base_model.eval()
    try:
        return AutoModel.from_pretrained(source.name_or_path, dtype=torch.float32, **source.kwargs()).eval()
    except (OSError, ValueError) as e:
        raise ProtegeError(
            f"student.embeddings projected reads the pretrained embeddings of student.model {name!r}, which cannot "
            f"be loaded: {e}. Use student.embeddings random, or a student.model with weights"
        ) from None


def _word_outputs(base: Any, tokenizer: Any, vocab: int, batch: int = 512) -> Any:
    """(vocab x D) the mean output state of ``base`` over [start] word-piece [end], for every word piece id; a
    tokenizer without start and end tokens gives the piece alone."""
    import torch

    ends = [t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id) if t is not None]
    rows = []
    with torch.inference_mode():
        for lo in range(0, vocab, batch):
            ids = torch.arange(lo, min(lo + batch, vocab)).unsqueeze(1)
            if len(ends) == 2:
                ids = torch.cat([torch.full_like(ids, ends[0]), ids, torch.full_like(ids, ends[1])], 1)
            out = base(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            rows.append(out.mean(1).float())
    return torch.cat(rows)


# -- students cut from the teacher ---------------------------------------------------------------------------


def load_teacher_classifier(
    teacher: TeacherConfig, use: str = "student.init teacher_layers copies its layers",
    fix: str = "Use student.init pretrained (student.model an encoder) or scratch",
) -> tuple[Any, Any]:
    """(model in float32, tokenizer) of an 'hf:' sequence-classifier teacher; any other model is refused,
    naming it, ``use`` (the setting that needs it) and ``fix``, before its weights are loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    source = resolve_source(teacher.model.split(":", 1)[1])
    kw: dict[str, Any] = dict(trust_remote_code=teacher.trust_remote_code, **source.kwargs())
    try:
        config = AutoConfig.from_pretrained(source.name_or_path, **kw)
    except (OSError, ValueError) as e:
        raise ProtegeError(f"cannot load the teacher {teacher.model!r} ({use}): {e}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ProtegeError(
            f"{use}: it needs a sequence-classifier teacher; teacher "
            f"{teacher.model!r} is {', '.join(archs) or 'a model of no named architecture'}, not a "
            f"*ForSequenceClassification. {fix}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **kw)
        model = AutoModelForSequenceClassification.from_pretrained(source.name_or_path, dtype=torch.float32, **kw)
    except OSError as e:
        raise ProtegeError(f"cannot load the teacher {teacher.model!r} ({use}): {e}") from None
    return model, tokenizer


def label_order(id2label: dict[Any, str], labels: tuple[str, ...], who: str) -> list[int]:
    """The head row of each task label, in task order: ``id2label`` names (the model's config) matched to
    ``labels`` case-insensitively; a classifier whose names differ is refused, naming ``who``."""
    names = {int(i): str(n) for i, n in id2label.items()}
    by_name = {n.casefold(): i for i, n in names.items()}
    missing = [x for x in labels if x.casefold() not in by_name]
    if missing or len(names) != len(labels):
        raise ProtegeError(
            f"teacher {who!r} predicts labels {list(names.values())} but the task has {list(labels)}; "
            "name task.labels as the classifier does"
        )
    return [by_name[x.casefold()] for x in labels]


def _reorder_head(model: Any, order: list[int]) -> None:
    """Put the rows of the head's output layer (the last linear layer outside the encoder that writes one
    logit per label) in ``order``, so logit j is the task's label j."""
    import torch

    encoder = {id(m) for m in model.base_model.modules()}
    n = model.config.num_labels
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in encoder
             and m.out_features == n]
    if not heads:
        raise ProtegeError(f"cannot find the output layer of {type(model).__name__}'s classification head (a linear "
                           f"layer with {n} outputs); student.init teacher_layers cannot reorder its labels")
    head = heads[-1]
    with torch.no_grad():
        head.weight.copy_(head.weight[order].clone())  # (C, H)
        if head.bias is not None:
            head.bias.copy_(head.bias[order].clone())  # (C,)


def _encoder_layers(model: Any) -> tuple[Any, str, Any]:
    """(the module holding the encoder's layer list, its attribute name, the list)."""
    import torch

    n = model.config.num_hidden_layers
    for module in model.base_model.modules():
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == n:
                return module, name, child
    raise ProtegeError(
        f"cannot find the {n} encoder layers of {type(model).__name__}; student.init teacher_layers supports "
        "encoders whose layers form one list (BERT, MiniLM, RoBERTa, DistilBERT, DeBERTa ...)"
    )


def keep_encoder_layers(model: Any, keep: list[int]) -> Any:
    """Cut ``model`` (in place) down to the encoder layers ``keep``, in that order, and return it; the config's
    layer count follows (and any per-layer list or ``layer_idx``)."""
    import torch

    parent, name, layers = _encoder_layers(model)
    n = len(layers)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise ProtegeError(
            f"student.keep_layers {keep} must be distinct increasing layer indices in [0, {n - 1}] "
            f"(the teacher has {n} layers)"
        )
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(parent, name, kept)
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return model


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def save_student(model: Any, tokenizer: Any, path: Path, card: StudentCard) -> None:
    """save_pretrained (safetensors) plus the card, protege.json; the label names are also in config.id2label."""
    if card.kind != "classifier":
        raise ValueError(f"a classifier student is saved with a classifier's card, not a {card.kind}'s")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    card.write(path)


def load_student(path: Path) -> tuple[Any, Any, StudentCard]:
    """(model in eval mode, tokenizer, card) of a saved classifier student."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    card = StudentCard.read(path)
    if card.kind != "classifier":
        raise ProtegeError(f"{str(path)!r} is a {card.kind} student, not a classifier")
    register_students()  # a protege-bert (student.pooling mean) or protege-bilstm student
    model = AutoModelForSequenceClassification.from_pretrained(path)
    id2label = model.config.id2label or {}
    if tuple(id2label.get(i, f"LABEL_{i}") for i in range(model.config.num_labels)) != card.labels:
        raise ProtegeError(f"{str(path)!r}: the card's labels {list(card.labels or ())} are not those of the model's "
                           f"head (config.json id2label {id2label}); the student directory is damaged, retrain it")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer, card


