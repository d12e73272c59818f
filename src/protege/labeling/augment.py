"""Transfer-set augmentation (Tang et al. 2019): new unlabeled texts made from the training texts, for the teacher
to label and the student to learn from. They are never evaluated on.

Tang et al. ("Distilling Task-Specific Knowledge from BERT into Simple Neural Networks", 2019, section 3.3) make
each synthetic example from a training sentence by walking its words: with probability ``p_mask`` a word becomes
the mask token, otherwise with ``p_pos`` it is swapped for another word of the same part of speech; then, with
``p_ng``, the example is cut to a random n-gram (n from 1 to 5). protege does the same with two changes: the swap
draws a word of the same *shape* (lowercase, Titlecase, UPPERCASE, digits) by its frequency in the training
texts, an offline stand-in for part of speech that needs no tagger; and the longest n-gram is a setting
(``ngram_max``, 5 by default), so that a cut can also be a clause of the sentence, as the labelled phrases of a
treebank are.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from ..errors import ProtegeError
from ..recipe import AugmentConfig, Recipe
from ..teachers.base import Generate, Request
from .data import Example

__all__ = [
    "DEFAULT_MASK",
    "PARAPHRASE_PROMPT",
    "AugmentedExample",
    "augment_texts",
    "check_paraphrase",
    "paraphrase_request",
    "student_mask_token",
    "student_neighbours",
    "word_neighbours",
]

DEFAULT_MASK = "[MASK]"  # for a student tokenizer without a mask token
TRIES_PER_TEXT = 10  # candidates drawn per wanted text before a row settles for fewer
PARAPHRASE_PROMPT = (
    "Rewrite the following customer text in different words, keeping its meaning and intent. "
    "Reply with the rewritten text only."
)

_WORDS = r"\w+(?:['’]\w+)*"  # a word keeps its apostrophes ("I'm" is one word, never swapped for "I'second")
_RUNS = re.compile(rf"{_WORDS}|\W+")  # alternating word and non-word runs: "".join(runs) is the text again
_WORD = re.compile(r"\w")


@dataclass(frozen=True, slots=True)
class AugmentedExample(Example):
    """An example made from the training row ``source`` (its id); ``gold`` is always None."""

    source: str


def _shape(word: str) -> str | None:
    """'digits', 'upper', 'title' or 'lower'; None for a mixed word ('iPhone', 'A1'), which is never swapped."""
    if word.isdigit():
        return "digits"
    if word.isalpha():
        if len(word) > 1 and word.isupper():
            return "upper"
        if word.istitle():
            return "title"
        if word.islower():
            return "lower"
    return None


class _Vocabulary:
    """The training texts' words by shape, drawn in proportion to their counts."""

    def __init__(self, texts: Iterable[str]):
        counts = Counter(w for t in texts for w in re.findall(_WORDS, t))
        by_shape: dict[str, list[tuple[str, int]]] = {}
        for w, n in sorted(counts.items()):  # sorted: the same draws whatever order the texts came in
            s = _shape(w)
            if s is not None:
                by_shape.setdefault(s, []).append((w, n))
        self.words = {s: [w for w, _ in wn] for s, wn in by_shape.items()}
        self.cum = {s: list(accumulate(n for _, n in wn)) for s, wn in by_shape.items()}

    def swap(self, word: str, rng: random.Random) -> str:
        """Another word of ``word``'s shape, by corpus frequency (rejection keeps the proportions exact among the
        others); ``word`` itself when its shape has no other word or the draws keep hitting it."""
        s = _shape(word)
        if s is None or len(self.words[s]) < 2:
            return word
        words, cum = self.words[s], self.cum[s]
        for _ in range(TRIES_PER_TEXT):
            w = words[bisect.bisect_right(cum, rng.random() * cum[-1])]
            if w != word:
                return w
        return word


class _Neighbours:
    """Swaps from each word's nearest words in a word-embedding table (``near``: word -> its neighbours, nearest
    first), drawn uniformly and put in the word's shape; a word without neighbours swaps from the corpus."""

    def __init__(self, near: Mapping[str, Sequence[str]], corpus: _Vocabulary):
        self.near, self.corpus = near, corpus

    def swap(self, word: str, rng: random.Random) -> str:
        near = self.near.get(word)
        if not near:
            return self.corpus.swap(word, rng)
        w = near[rng.randrange(len(near))]
        shape = _shape(word)
        return w.upper() if shape == "upper" else w.title() if shape == "title" else w


def word_neighbours(words: Iterable[str], tokenizer: Any, table: Any, k: int) -> dict[str, tuple[str, ...]]:
    """For each alphabetic word that ``tokenizer`` reads as one piece, the ``k`` whole words nearest to that piece by
    cosine in ``table`` (vocabulary x width, the model's input embeddings), nearest first. A whole word is a piece
    that is a word of two letters or more on its own (not a '##' continuation, not a special token)."""
    import torch

    rows = table.shape[0]
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(rows)))
    forms = [tokenizer.convert_tokens_to_string([p]).strip() for p in pieces]
    maybe = [i for i, f in enumerate(forms) if i not in special and len(f) > 1 and f.isalpha()]
    again = tokenizer([forms[i] for i in maybe], add_special_tokens=False)["input_ids"]
    whole = torch.tensor([i for i, ids in zip(maybe, again) if ids == [i]], dtype=torch.long)
    words = sorted({w for w in words if w.isalpha()})
    ids = tokenizer(words, add_special_tokens=False)["input_ids"] if words else []
    asked = [(w, x[0]) for w, x in zip(words, ids) if len(x) == 1 and x[0] < rows and x[0] not in special]
    if not asked or not len(whole):
        return {}
    unit = torch.nn.functional.normalize(table.detach().float(), dim=-1)
    candidates = unit[whole]  # (W, D)
    out: dict[str, tuple[str, ...]] = {}
    for start in range(0, len(asked), 1024):  # (1024, W) similarities at a time
        part = asked[start : start + 1024]
        sims = unit[torch.tensor([i for _, i in part])] @ candidates.T
        sims[whole.unsqueeze(0) == torch.tensor([i for _, i in part]).unsqueeze(1)] = -2.0  # never the word itself
        top = sims.topk(min(k, len(whole)), dim=1).indices
        for (w, _), row in zip(part, top.tolist()):
            out[w] = tuple(forms[int(whole[j])] for j in row)
    return out


def _rng(seed: int, row_id: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"augment:{seed}:{row_id}".encode()).digest()[:8], "big"))


def _candidate(text: str, cfg: AugmentConfig, vocab: _Vocabulary | _Neighbours, mask_token: str,
               rng: random.Random) -> str:
    """One synthetic text: each word masked with ``mask_p``, else swapped with ``replace_p`` (one uniform draw per
    word, as Tang et al., so the two never both apply), then with ``ngram_p`` cut to an n-gram of the words (n from
    1 to ``ngram_max``)."""
    runs = _RUNS.findall(text)
    words = [i for i, r in enumerate(runs) if _WORD.match(r)]
    for i in words:
        u = rng.random()
        if u < cfg.mask_p:
            runs[i] = mask_token
        elif u < cfg.mask_p + cfg.replace_p:
            runs[i] = vocab.swap(runs[i], rng)
    if rng.random() < cfg.ngram_p:
        n = rng.randint(1, cfg.ngram_max)
        if len(words) > n:
            start = rng.randrange(len(words) - n + 1)
            runs = runs[words[start] : words[start + n - 1] + 1]
    return "".join(runs).strip()


def augment_texts(
    examples: list[Example], cfg: AugmentConfig, seed: int, mask_token: str, avoid: Iterable[str] = (),
    neighbours: Mapping[str, Sequence[str]] | None = None,
) -> list[AugmentedExample]:
    """``cfg.per_text`` new texts per example, ids ``f"{src.id}~aug{j}"``, in the examples' order.

    Every new text differs from every other new text, from every example's text and from ``avoid`` (pass the
    held-out texts, so none is trained on by accident). With ``cfg.replace_with`` 'neighbours', swaps come from
    ``neighbours`` (:func:`word_neighbours`, made by :func:`student_neighbours` for a recipe), other words' from the
    corpus. The draws are seeded by ``seed`` and the row's id, so a
    rerun makes the same texts (and finds their labels in the store). A row gets fewer texts only when
    ``TRIES_PER_TEXT * per_text`` candidates held no new one (a one-word text with only n-gram cutting on).
    """
    if cfg.per_text == 0:
        return []
    if cfg.mask_p == cfg.replace_p == cfg.ngram_p == 0:
        raise ProtegeError(
            f"data.augment.per_text is {cfg.per_text} but mask_p, replace_p and ngram_p are all 0, so no new text "
            "can be made; set one of them above 0, or data.augment.per_text: 0"
        )
    vocab: _Vocabulary | _Neighbours = _Vocabulary(e.text for e in examples)
    if cfg.replace_with == "neighbours" and cfg.replace_p:
        if neighbours is None:
            raise ValueError("data.augment.replace_with 'neighbours' needs the words' neighbours (student_neighbours)")
        vocab = _Neighbours(neighbours, vocab)
    taken = {e.text.strip() for e in examples} | {t.strip() for t in avoid}
    out: list[AugmentedExample] = []
    for src in examples:
        rng, made = _rng(seed, src.id), 0
        for _ in range(TRIES_PER_TEXT * cfg.per_text):
            if made == cfg.per_text:
                break
            text = _candidate(src.text, cfg, vocab, mask_token, rng)
            if text and text not in taken:
                taken.add(text)
                out.append(AugmentedExample(f"{src.id}~aug{made}", text, None, src.where, src.id))
                made += 1
    return out


def student_mask_token(recipe: Recipe) -> str:
    """The student tokenizer's mask token (so a masked word reads as one to the student), else ``[MASK]``."""
    from transformers import AutoTokenizer

    from ..sources import resolve_source

    source = resolve_source(recipe.student.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **source.kwargs())
    except (OSError, ValueError) as e:
        raise ProtegeError(
            f"cannot load the student's tokenizer from {recipe.student.model!r} to find its mask token for "
            f"data.augment.mask_p: {e}. Fix student.model, or set data.augment.mask_p: 0"
        ) from None
    return tokenizer.mask_token or DEFAULT_MASK


def student_neighbours(recipe: Recipe, texts: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """:func:`word_neighbours` of the words in ``texts`` in student.model's tokenizer and word-embedding table, for
    ``data.augment.replace_with: neighbours``."""
    from transformers import AutoModel, AutoTokenizer

    from ..sources import resolve_source

    source = resolve_source(recipe.student.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **source.kwargs())
        table = AutoModel.from_pretrained(source.name_or_path, **source.kwargs()).get_input_embeddings().weight
    except (OSError, ValueError) as e:
        raise ProtegeError(
            f"data.augment.replace_with 'neighbours' reads the nearest words from student.model's word embeddings, "
            f"and {recipe.student.model!r} did not load: {e}. Fix student.model, or set data.augment.replace_with: "
            "corpus"
        ) from None
    return word_neighbours((w for t in texts for w in re.findall(_WORDS, t)), tokenizer, table,
                           recipe.data.augment.neighbours)


def check_paraphrase(recipe: Recipe) -> None:
    """Refuse ``data.augment.paraphrase`` where no API teacher can write the paraphrases."""
    if not recipe.data.augment.paraphrase:
        return
    if recipe.task.kind != "classification":
        raise ProtegeError(
            "data.augment.paraphrase makes new texts for a classification task's teacher to label; set it false "
            "(generation tasks learn from the teacher's answers to the prompts given)"
        )
    if recipe.teacher.kind != "api":
        raise ProtegeError(
            f"data.augment.paraphrase asks the teacher to rewrite each training text, and teacher "
            f"{recipe.teacher.model!r} is not an API teacher ('openai:' or 'anthropic:'). Set "
            "data.augment.paraphrase: false, or use an API teacher"
        )


def paraphrase_request(text: str) -> Request:
    """The generation request that asks the teacher to rewrite ``text``: greedy, about twice the text's length in
    tokens at most (four characters a token), no logprobs."""
    limit = max(32, min(256, len(text) // 2))
    return Request(
        messages=({"role": "user", "content": f"{PARAPHRASE_PROMPT}\n\n{text}"},),
        labels=(),
        text=text,
        generate=Generate(max_tokens=limit, top_logprobs=0),
    )
