"""The store's compact row format: a teacher signal as bytes, and a request as the part that differs from its
template. Pure functions; the SQL (the ``strings`` and ``templates`` tables that hold the shared parts once)
is :mod:`protege.store`'s.

A signal is a small JSON header (the signal's own :meth:`TeacherSignal.to_json` without its defaults, every
repeated string replaced by the id of its row in ``strings``: the label list, token strings, the tokenizer
name) followed by its numbers as packed arrays, byte-shuffled (the i-th byte of every value together, so
exponents and the zero high bytes of small integers compress), the whole deflated against a fixed dictionary
of the header's words when that is smaller. What a signal repeats is kept once: an answer that is the top
label, a generated reply that is its tokens, the token produced (its place among the top ones), a local
teacher's top values when they are its ``top_logprobs``.

Fidelity (measured in benchmarks/store_size.py and pinned in tests/test_store_compact.py):

- label distributions (``probs``, ``raw_probs``): float32, the precision the student's loss reads them in
  (:mod:`protege.training.losses` computes in float32), so a student trained from the store sees the same
  values bit for bit. A probability p keeps a relative error of at most 2**-24 (6e-8) when p >= 2**-126 and
  an absolute error below 2**-149 (1.4e-45) under that; a 77-label distribution's sum moves by at most 5e-6.
  A value already in float32 (a torch float32 softmax) is kept exactly. Stores written before this rounding
  keep their float64 arrays and read back as they were.
- dense ``logits``, every string and integer: exact. A float array is stored as float32 when every value
  round-trips through float32 exactly, else as float64.
- top-k token log-probabilities (the values of ``top`` and ``top_logprobs``): float16, what makes a top-20
  generation signal fit in 100 bytes a token. The error of a log-probability lp is at most half a float16 step:
  2**-12 nats for |lp| < 1, 2**-9 for |lp| < 4, 2**-8 for |lp| < 16, 2**-7 for |lp| < 32 (so the relative
  error of exp(lp) is below 0.8% and its absolute error below 2**-11 / e = 1.8e-4 everywhere); values below
  -65504 become -inf. ``tail_mass``: float32 (relative error at most 2**-24). Rounding twice gives the same
  value, so a signal read back is stored back unchanged.
"""

from __future__ import annotations

import functools
import json
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .signals import TeacherSignal

__all__ = ["as_stored", "decode_signal", "deflate", "encode_signal", "inflate", "join_request", "split_request",
           "template_from"]

Intern = Callable[[str], int]  # a string -> its id in the store's ``strings`` table
Lookup = Callable[[int], str]  # and back
# A tokenizer's vocabulary as far as signals showed it, in the store's ``token_ids`` table: (tokenizer's string
# id, token id, the token's string) -> False when that id was recorded with another string; and back.
VocabPut = Callable[[int, int, str], bool]
VocabGet = Callable[[int, int], str]


# --------------------------------------------------------------------------------------------------------------
# arrays


class _Arrays:
    """Numeric arrays appended to one buffer; the header names each by its index in ``spec``."""

    def __init__(self) -> None:
        self.spec: list[list[Any]] = []  # [dtype, length] per array
        self.chunks: list[bytes] = []

    def add(self, a: np.ndarray) -> int:
        shuffled = a.view(np.uint8).reshape(len(a), a.dtype.itemsize).T.tobytes()  # (itemsize, n)
        self.spec.append([a.dtype.str, len(a)])
        self.chunks.append(shuffled)
        return len(self.spec) - 1

    def exact(self, values: Sequence[float]) -> int:
        """Floats, exactly: float32 when that loses nothing, else float64."""
        a = np.asarray(values, dtype="<f8")
        f32 = a.astype("<f4")
        return self.add(f32 if np.array_equal(f32.astype("<f8"), a, equal_nan=True) else a)

    def single(self, values: Sequence[float]) -> int:
        """float32: label distributions and tail masses (relative error at most 2**-24)."""
        return self.add(np.asarray(values, dtype="<f8").astype("<f4"))

    def half(self, values: Sequence[float]) -> int:
        """Log-probabilities as float16 (the stated rounding; see the module docstring)."""
        with np.errstate(over="ignore"):  # below -65504 is -inf: a probability of 0 either way
            return self.add(np.asarray(values, dtype="<f8").astype("<f2"))

    def ints(self, values: Sequence[int]) -> int:
        a = np.asarray(values, dtype="<i8")
        if len(a) and a.min() >= 0:
            for dt in ("<u1", "<u2", "<u4"):
                if a.max() <= np.iinfo(dt).max:
                    return self.add(a.astype(dt))
        return self.add(a)


def _unpack(spec: list[list[Any]], body: bytes) -> list[np.ndarray]:
    out, at = [], 0
    for dt, n in spec:
        dtype = np.dtype(dt)
        size = n * dtype.itemsize
        planes = np.frombuffer(body, np.uint8, size, at).reshape(dtype.itemsize, n)
        out.append(np.ascontiguousarray(planes.T).view(dtype).reshape(n))
        at += size
    return out


def _ragged(rows: Sequence[Sequence[Any]]) -> tuple[list[int], list[Any]]:
    """(length of each row, all values in one list)."""
    return [len(r) for r in rows], [x for r in rows for x in r]


def _split(flat: list[Any], lengths: list[int]) -> list[list[Any]]:
    out, at = [], 0
    for n in lengths:
        out.append(flat[at : at + n])
        at += n
    return out


# --------------------------------------------------------------------------------------------------------------
# signals

# Format 1: header and arrays as they are; format 2: deflated against _ZDICT, the words every header repeats.
# Append only: a blob names its format, so a new one gets a new number and the old ones stay readable.
_RAW, _DEFLATED = 1, 2
_LEN = struct.Struct("<I")  # the header's length, first in the (deflated) body
_ZDICT = (
    '"arrays":[["<f8",["<f4",["<f2",["|u1",["<u2",["<u4",["<i8",'
    '{"distribution":{"labels":,"probs":,"method":"embedding","logits","label_logprobs","samples","hard_label",'
    '"ensemble","covered_mass":0.,"calibrated":true,"raw_probs":,"n_samples":},"text_is_top":true,"text":"answer":'
    '"rationale":"thinking":"truncated":true,"text_is_tokens":true,"token_logprobs":{"tokens":,"top":,'
    '"top_values_are_top_logprobs":true,"tail_mass":,"tokenizer":,"temperature":1.0,"ids":,"top_ids":,'
    '"top_logprobs":},"logits":,"usage":{"input_tokens":,"output_tokens":,"cached_tokens":,"reasoning_tokens":}'
).encode()
_DEFAULTS = {"covered_mass": 1.0, "calibrated": False}  # LabelDistribution's, left out of a header


def _index_in(rows: Sequence[Sequence[Any]], values: Sequence[Any]) -> tuple[list[int], list[Any]]:
    """Where each value stands in its row (255: not in its first 255), and the values not found there."""
    at, missing = [], []
    for row, v in zip(rows, values):
        i = next((j for j, x in enumerate(row[:255]) if x == v), 255)
        at.append(i)
        if i == 255:
            missing.append(v)
    return at, missing


def _from_index(rows: Sequence[Sequence[Any]], at: list[int], missing: list[Any]) -> list[Any]:
    it = iter(missing)
    return [row[i] if i != 255 else next(it) for row, i in zip(rows, at)]


def encode_signal(signal: TeacherSignal, intern: Intern, vocab_put: VocabPut) -> bytes:
    """The signal as bytes (see the module docstring); :func:`decode_signal` reads it back."""
    head = signal.to_json()
    arrays = _Arrays()
    if (dist := head.get("distribution")) is not None:
        for k in [k for k, v in dist.items() if v is None or _DEFAULTS.get(k, ...) == v]:
            del dist[k]
        dist_labels = dist["labels"]
        dist["labels"] = intern(json.dumps(dist_labels, ensure_ascii=False))
        stored = np.asarray(dist["probs"], dtype="<f8").astype("<f4")
        dist["probs"] = arrays.add(stored)
        if "raw_probs" in dist:
            dist["raw_probs"] = arrays.single(dist["raw_probs"])
        top = dist_labels[int(np.argmax(stored))] if len(stored) else None  # as read back: rounding can tie two
        if head.get("text") is not None and head["text"] == top:
            del head["text"]  # an answer that is the top label: kept once
            head["text_is_top"] = True
    if (tl := head.get("token_logprobs")) is not None:
        for k in [k for k, v in tl.items() if v is None]:
            del tl[k]
        tokens, top = tl["tokens"], tl["top"]
        if head.get("text") is not None and head["text"] == "".join(tokens):
            del head["text"]  # a generated reply is its tokens: kept once
            head["text_is_tokens"] = True
        keys = [list(d) for d in top]
        at, missing = _index_in(keys, tokens)  # the token produced is nearly always among the top ones
        tl["tokens"] = [arrays.ints(at), arrays.ints([intern(t) for t in missing])]
        lengths, flat = _ragged(keys)
        tl["tokenizer"] = tokenizer = intern(tl["tokenizer"])
        top_ids = tl.get("top_ids")
        if top_ids is not None and all(len(k) == len(i) for k, i in zip(keys, top_ids)) and all(
            vocab_put(tokenizer, i, k) for ks, ids in zip(keys, top_ids) for k, i in zip(ks, ids)
        ):
            tl["top"] = [arrays.ints(lengths), None]  # a local teacher's top strings are those of its top ids
        else:
            tl["top"] = [arrays.ints(lengths), arrays.ints([intern(k) for k in flat])]
        if "top_logprobs" in tl and all(list(d.values()) == list(lp) for d, lp in zip(top, tl["top_logprobs"])):
            tl["top_values_are_top_logprobs"] = True  # a local teacher's, when no two ids decode alike
        else:
            tl["top"].append(arrays.half([v for d in top for v in d.values()]))
        tl["tail_mass"] = arrays.single(tl["tail_mass"])
        if "top_ids" in tl:
            lengths, flat = _ragged(tl["top_ids"])
            ids = None
            if "ids" in tl:
                at, missing = _index_in(tl["top_ids"], tl["ids"])
                ids = [arrays.ints(at), arrays.ints(missing)]
            tl["top_ids"] = [arrays.ints(lengths), arrays.ints(flat)]
            if ids is not None:
                tl["ids"] = ids
        elif "ids" in tl:
            tl["ids"] = [arrays.ints(tl["ids"])]
        if "top_logprobs" in tl:
            lengths, flat = _ragged(tl["top_logprobs"])
            tl["top_logprobs"] = [arrays.ints(lengths), arrays.half(flat)]
    if head.get("logits") is not None:
        lengths, flat = _ragged(head["logits"])
        head["logits"] = [arrays.ints(lengths), arrays.exact(flat)]
    head["arrays"] = arrays.spec
    header = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode()
    body = _LEN.pack(len(header)) + header + b"".join(arrays.chunks)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=_ZDICT)  # raw deflate: no header, no checksum
    packed = deflate.compress(body) + deflate.flush()
    if len(packed) < len(body):
        return bytes([_DEFLATED]) + packed
    return bytes([_RAW]) + body


@functools.lru_cache(maxsize=1024)
def _labels(stored: str) -> tuple[str, ...]:
    """A label list as the store keeps it (JSON, once in ``strings``), parsed once per list, not once per row."""
    return tuple(json.loads(stored))


def decode_signal(blob: bytes, lookup: Lookup, vocab_get: VocabGet) -> TeacherSignal:
    """The signal :func:`encode_signal` wrote (label probabilities rounded to float32, token log-probabilities to
    float16)."""
    body = blob[1:]
    if blob[0] == _DEFLATED:
        inflate = zlib.decompressobj(-15, zdict=_ZDICT)
        body = inflate.decompress(body) + inflate.flush()
    elif blob[0] != _RAW:
        raise ValueError(f"unknown signal format {blob[0]}")
    (n,) = _LEN.unpack_from(body)
    head = json.loads(body[_LEN.size : _LEN.size + n])
    arrays = _unpack(head.pop("arrays"), body[_LEN.size + n :])

    def floats(i: int) -> list[float]:
        return arrays[i].astype(np.float64).tolist()

    def ints(i: int) -> list[int]:
        return arrays[i].tolist()

    if (dist := head.get("distribution")) is not None:
        dist["labels"] = _labels(lookup(dist["labels"]))
        probs = arrays[dist["probs"]]
        dist["probs"] = probs.astype(np.float64).tolist()
        if "raw_probs" in dist:
            dist["raw_probs"] = floats(dist["raw_probs"])
        if head.pop("text_is_top", False) and len(probs):
            head["text"] = dist["labels"][int(np.argmax(probs))]  # the distribution's top: the first of a tie
    if (tl := head.get("token_logprobs")) is not None:
        tokenizer = tl["tokenizer"]
        tl["tokenizer"] = lookup(tokenizer)
        lengths = ints(tl["top"][0])
        if "top_ids" in tl:
            lengths_i, flat_i = tl["top_ids"]
            tl["top_ids"] = _split(ints(flat_i), ints(lengths_i))
            if "ids" in tl:
                tl["ids"] = _from_index(tl["top_ids"], ints(tl["ids"][0]), ints(tl["ids"][1]))
        elif "ids" in tl:
            tl["ids"] = ints(tl["ids"][0])
        if tl["top"][1] is None:
            keys = [[vocab_get(tokenizer, i) for i in row] for row in tl["top_ids"]]
        else:
            keys = _split([lookup(i) for i in ints(tl["top"][1])], lengths)
        tl["tokens"] = _from_index(keys, ints(tl["tokens"][0]), [lookup(i) for i in ints(tl["tokens"][1])])
        if "top_logprobs" in tl:
            lengths_i, flat_i = tl["top_logprobs"]
            tl["top_logprobs"] = _split(floats(flat_i), ints(lengths_i))
        if tl.pop("top_values_are_top_logprobs", False):
            values = tl["top_logprobs"]
        else:
            values = _split(floats(tl["top"][2]), lengths)
        tl["top"] = [dict(zip(k, v)) for k, v in zip(keys, values)]
        tl["tail_mass"] = floats(tl["tail_mass"])
        if head.pop("text_is_tokens", False):
            head["text"] = "".join(tl["tokens"])
    if head.get("logits") is not None:
        lengths_i, flat_i = head["logits"]
        head["logits"] = _split(floats(flat_i), ints(lengths_i))
    return TeacherSignal.from_json(head)


def as_stored(signal: TeacherSignal) -> TeacherSignal:
    """The signal as a store gives it back (probabilities in float32, token log-probabilities in float16): what
    a fresh answer becomes once it is cached, without a store."""
    strings: dict[str, int] = {}
    vocab: dict[tuple[int, int], str] = {}

    def intern(s: str) -> int:
        return strings.setdefault(s, len(strings))

    def vocab_put(tokenizer: int, i: int, s: str) -> bool:
        return vocab.setdefault((tokenizer, i), s) == s

    blob = encode_signal(signal, intern, vocab_put)
    names = {i: s for s, i in strings.items()}
    return decode_signal(blob, names.__getitem__, lambda tokenizer, i: vocab[tokenizer, i])


# --------------------------------------------------------------------------------------------------------------
# requests: a template (what many requests share) and the part that differs


def split_request(request_json: str, prefix: str, suffix: str) -> str | None:
    """The part of ``request_json`` between the template's ``prefix`` and ``suffix``; None when it does not
    start and end with them."""
    if len(prefix) + len(suffix) <= len(request_json) and request_json.startswith(prefix) \
            and request_json.endswith(suffix):
        return request_json[len(prefix) : len(request_json) - len(suffix)]
    return None


def join_request(prefix: str, middle: str, suffix: str) -> str:
    return prefix + middle + suffix


def deflate(text: str) -> bytes:
    """Raw deflate (no zlib header or checksum: SQLite's pages are what guards the bytes)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(text.encode()) + packer.flush()


def inflate(blob: bytes) -> str:
    unpacker = zlib.decompressobj(-15)
    return (unpacker.decompress(blob) + unpacker.flush()).decode()


_MIN_TEMPLATE = 64  # characters two requests must share before a template is worth a row


def template_from(a: str, b: str) -> tuple[str, str] | None:
    """The (prefix, suffix) two requests share, cut back to an escaped newline or a quote so that a text's own
    first or last words (two texts that both start with 'My order') stay out of it; None when they share too
    little to be worth a template."""
    limit = min(len(a), len(b))
    p = 0
    while p < limit and a[p] == b[p]:
        p += 1
    s = 0
    while s < limit - p and a[-1 - s] == b[-1 - s]:
        s += 1
    prefix = a[:p]
    cut = max(prefix.rfind("\\n") + 2, prefix.rfind('"') + 1)
    prefix = prefix[:cut] if cut > 0 else ""
    suffix = a[len(a) - s :] if s else ""
    ends = [i for i in (suffix.find("\\n"), suffix.find('"')) if i >= 0]
    suffix = suffix[min(ends) :] if ends else ""
    if len(prefix) + len(suffix) < _MIN_TEMPLATE:
        return None
    return prefix, suffix
