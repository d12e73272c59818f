"""The floor every classification report shows: a TF-IDF + logistic-regression model trained on the same
teacher labels the students learned from.

If a linear model of a few hundred kilobytes matches the distilled student, the user should know before paying
for a transformer. Features are word 1-2 grams with sublinear term frequency (1 + log tf), kept when they occur
in at least two training texts (in one, for a corpus too small to have any such term), L2-normalised TF-IDF;
the classifier is a multinomial logistic regression with L2 penalty at a fixed ``C`` (:data:`C`), fitted with
L-BFGS (deterministic; the seed is passed for any solver that is not). No gold label and no held-out text is
ever seen: the training rows are the teacher-labelled training signals, augmented texts included.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ProtegeError

__all__ = ["FLOOR_NAME", "C", "fit_floor", "floor_parameters", "floor_probs", "floor_size_bytes"]

FLOOR_NAME = "TF-IDF + logistic regression (floor)"
C = 10.0  # inverse L2 strength; 10 was best or within 0.3 points of it on SST-2 and TREC (gold labels, C in 1..100)


def _pipeline(min_df: int, seed: int, classes: int) -> Any:
    from sklearn.dummy import DummyClassifier
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    # a teacher that gave one label to every training text leaves nothing to regress: the floor is that label
    head = (LogisticRegression(C=C, max_iter=2000, random_state=seed) if classes > 1
            else DummyClassifier(strategy="most_frequent"))
    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=min_df), head)


def fit_floor(texts: Sequence[str], labels: Sequence[str], seed: int) -> Any:
    """The fitted scikit-learn pipeline (TF-IDF, then logistic regression) for ``texts`` labelled ``labels``."""
    if not texts or len(texts) != len(labels):
        raise ProtegeError(f"the floor needs one teacher label per training text, got {len(texts)} texts and "
                           f"{len(labels)} labels; rerun `protege label`")
    classes = len(set(labels))
    try:
        return _pipeline(2, seed, classes).fit(list(texts), list(labels))
    except ValueError as e:
        if "no terms remain" not in str(e):  # only a tiny corpus has no term in two texts
            raise
        return _pipeline(1, seed, classes).fit(list(texts), list(labels))


def floor_probs(pipe: Any, texts: Sequence[str], label_names: Sequence[str]) -> np.ndarray:
    """(N, C) probabilities over ``label_names`` in that order; a label no training text had gets 0."""
    p = pipe.predict_proba(list(texts))  # (N, K) over pipe.classes_, K <= C
    out = np.zeros((len(texts), len(label_names)))
    col = {name: j for j, name in enumerate(label_names)}
    for k, name in enumerate(pipe.classes_):
        out[:, col[name]] = p[:, k]
    return out


def floor_size_bytes(pipe: Any) -> int:
    """Bytes of the pickled fitted pipeline: what shipping the floor would take (vocabulary, idf, weights)."""
    return len(pickle.dumps(pipe, protocol=pickle.HIGHEST_PROTOCOL))


def floor_parameters(pipe: Any) -> int:
    """Fitted numbers the floor computes with: one idf per term, then the weights and biases of each class."""
    vec, head = pipe[0], pipe[-1]
    n = int(vec.idf_.size)
    if hasattr(head, "coef_"):
        n += int(head.coef_.size + head.intercept_.size)
    return n
