"""Given-token scores out of OpenAI-compatible completion bodies: pure functions, no I/O.

Two servers score the tokens of a prompt on ``/v1/completions`` with ``max_tokens: 1``:

- vLLM, ``prompt_logprobs: k`` with the prompt as token ids: per prompt position (the first is null) a dict
  ``{token id: {"logprob", "rank", "decoded_token"}}`` with the k likeliest ids and the prompt's own token. The
  ids are the request's, so nothing needs aligning.
- llama.cpp (llama-cpp-python's server), ``echo: true, logprobs: k`` with the prompt as text: ``tokens`` (each
  decoded alone, special tokens as "", partial UTF-8 bytes dropped), ``token_logprobs`` and ``top_logprobs``
  (token string -> log-probability, the k likeliest and the token itself) for the prompt as the server tokenized
  it, then the one generated token. Tokens equal to the model's BOS id are left out, and the first entry is
  null. The server tokenizes the text itself, so a student's sample that is not its canonical tokenization
  (" hel" + "lo" where the tokenizer writes " hello") is scored as the server's tokens; :func:`from_echo` keeps
  the positions whose token the server also has, at the same place in the text, and leaves the rest unscored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import PermanentError
from ..signals import TokenLogprobs
from .base import ScoreRequest

__all__ = ["from_prompt_logprobs", "from_echo", "server_piece"]


def server_piece(s: str) -> str:
    """A token's text as both sides are compared: without U+FFFD (a partial UTF-8 byte one side drops and the
    other renders as the replacement character)."""
    return s.replace("\ufffd", "")


def _tail(values: Sequence[float]) -> float:
    return max(0.0, 1.0 - math.fsum(math.exp(v) for v in values))


def from_prompt_logprobs(
    entries: Sequence[Mapping[str, Any] | None], request: ScoreRequest, name: str
) -> TokenLogprobs:
    """Scores from vLLM's ``prompt_logprobs`` (one entry per id of ``request.ids``)."""
    if len(entries) != len(request.ids):
        raise PermanentError(
            f"the server scored {len(entries)} prompt tokens for {len(request.ids)} token ids; it does not take the "
            "prompt as ids (teacher.provider 'vllm' needs vLLM's completions endpoint)"
        )
    tokens, tops, tails, top_ids, top_lps = [], [], [], [], []
    for i in range(request.start, len(request.ids)):
        given = request.ids[i]
        rows = sorted(((int(k), v) for k, v in (entries[i] or {}).items()), key=lambda kv: -float(kv[1]["logprob"]))
        by_id = {k: float(v["logprob"]) for k, v in rows}
        if given not in by_id:
            raise PermanentError(f"the server's prompt_logprobs at position {i} leave out the prompt's token {given}")
        top: dict[str, float] = {}
        for k, v in rows:
            top.setdefault(str(v.get("decoded_token") or ""), float(v["logprob"]))  # the likelier of equal strings
        given_str = str((entries[i] or {})[str(given)].get("decoded_token") or "")
        tokens.append(given_str)
        tops.append({given_str: by_id[given], **{k: v for k, v in top.items() if k != given_str}})
        tails.append(_tail(list(by_id.values())))
        top_ids.append(tuple(by_id))
        top_lps.append(tuple(by_id.values()))
    return TokenLogprobs(
        tokens=tuple(tokens), top=tuple(tops), tail_mass=tuple(tails), tokenizer=name, temperature=1.0,
        ids=request.ids[request.start :], top_ids=tuple(top_ids), top_logprobs=tuple(top_lps),
    )


def _span_keys(pieces: Sequence[str]) -> list[tuple[int, str, int]]:
    """Per piece, where it sits counted from the end of the text: (characters after it, its text, how many
    pieces with the same two came after it). Two tokenizations of one text give a token the same key exactly
    when both have it at that place."""
    keys: list[tuple[int, str, int]] = [(0, "", 0)] * len(pieces)
    after, seen = 0, {}
    for i in range(len(pieces) - 1, -1, -1):
        nth = seen.get((after, pieces[i]), 0)
        seen[(after, pieces[i])] = nth + 1
        keys[i] = (after, pieces[i], nth)
        after += len(pieces[i])
    return keys


def from_echo(
    logprobs: Any, prompt_tokens: int, completion_tokens: int, request: ScoreRequest, name: str
) -> TokenLogprobs:
    """Scores from llama.cpp's echoed prompt logprobs (``choices[0].logprobs``), aligned onto ``request.ids``
    by place in the text (see the module docstring); unaligned positions have an empty ``top``."""
    listed = list(logprobs.tokens or [])
    n = len(listed) - completion_tokens  # the prompt's entries, before the generated token
    first = server_piece(listed[0]) if listed else ""
    if n >= prompt_tokens or (request.tokens and first == server_piece(request.tokens[0])):
        # llama-cpp-python pairs the i-th listed token with the scores after it unless the prompt starts with the
        # model's BOS token (which it then leaves out): every value would be one position off. Told apart by the
        # count (nothing left out) or by the first listed token being the request's first (not left out).
        raise PermanentError(
            "the llama.cpp server's echoed log-probabilities are one position off for this model (its prompts do "
            "not start with its BOS token); score with vLLM (teacher.provider 'vllm') or a local 'hf:' teacher"
        )
    values, tops = list(logprobs.token_logprobs or []), list(logprobs.top_logprobs or [])
    server = {k: j for j, k in enumerate(_span_keys([server_piece(t) for t in listed[:n]]))}
    ours = _span_keys([server_piece(t) for t in request.tokens])
    tokens, out_tops, tails = [], [], []
    for i in range(request.start, len(request.ids)):
        piece = ours[i][1]
        j = server.get(ours[i])
        tokens.append(piece)
        if j is None or values[j] is None or tops[j] is None:
            out_tops.append({})  # the server has no token here (it tokenized this text otherwise) or no score
            tails.append(1.0)
            continue
        top: dict[str, float] = {}
        for k, v in dict(tops[j]).items():
            top.setdefault(server_piece(k), float(v))  # the likelier of two that read alike
        top[piece] = float(values[j])  # the given token's own value, whatever shares its string
        out_tops.append({piece: top.pop(piece), **top})
        tails.append(_tail(list(out_tops[-1].values())))
    return TokenLogprobs(
        tokens=tuple(tokens), top=tuple(out_tops), tail_mass=tuple(tails), tokenizer=name, temperature=1.0,
        ids=request.ids[request.start :],
    )
