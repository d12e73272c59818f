"""Transfer-set augmentation (Tang et al. 2019): new unlabeled texts made from the training texts, for the teacher
to label and the student to learn from. They are never evaluated on.

Tang et al. ("Distilling Task-Specific Knowledge from BERT into Simple Neural Networks", 2019, section 3.3) make
each synthetic example from a training sentence by walking its words: with probability ``p_mask`` a word becomes
the mask token, otherwise with ``p_pos`` it is swapped for another word of the same part of speech; then, with
``p_ng``, the example is cut to a random n-gram (n from 1 to 5). protege does the same with one change: the swap
draws a word of the same *shape* (lowercase, Titlecase, UPPERCASE, digits) by its frequency in the training
texts, an offline stand-in for part of speech that needs no tagger.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import accumulate

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
]

DEFAULT_MASK = "[MASK]"  # for a student tokenizer without a mask token
TRIES_PER_TEXT = 10  # candidates drawn per wanted text before a row settles for fewer
MAX_N = 5  # longest n-gram (Tang et al.: n from 1 to 5)
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


def _rng(seed: int, row_id: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"augment:{seed}:{row_id}".encode()).digest()[:8], "big"))


def _candidate(text: str, cfg: AugmentConfig, vocab: _Vocabulary, mask_token: str, rng: random.Random) -> str:
    """One synthetic text: each word masked with ``mask_p``, else swapped with ``replace_p`` (one uniform draw per
    word, as Tang et al., so the two never both apply), then with ``ngram_p`` cut to an n-gram of the words."""
    runs = _RUNS.findall(text)
    words = [i for i, r in enumerate(runs) if _WORD.match(r)]
    for i in words:
        u = rng.random()
        if u < cfg.mask_p:
            runs[i] = mask_token
        elif u < cfg.mask_p + cfg.replace_p:
            runs[i] = vocab.swap(runs[i], rng)
    if rng.random() < cfg.ngram_p:
        n = rng.randint(1, MAX_N)
        if len(words) > n:
            start = rng.randrange(len(words) - n + 1)
            runs = runs[words[start] : words[start + n - 1] + 1]
    return "".join(runs).strip()


def augment_texts(
    examples: list[Example], cfg: AugmentConfig, seed: int, mask_token: str, avoid: Iterable[str] = ()
) -> list[AugmentedExample]:
    """``cfg.per_text`` new texts per example, ids ``f"{src.id}~aug{j}"``, in the examples' order.

    Every new text differs from every other new text, from every example's text and from ``avoid`` (pass the
    held-out texts, so none is trained on by accident). The draws are seeded by ``seed`` and the row's id, so a
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
    vocab = _Vocabulary(e.text for e in examples)
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
