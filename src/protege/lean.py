"""A lean forward pass for BERT encoders, for inference: the same arithmetic as transformers' ``BertModel`` and
``BertForSequenceClassification`` in evaluation mode, written as a dozen tensor operations per layer.

Why: a student is small, and transformers' forward spends most of its time on bookkeeping around the arithmetic
(hooks, output capture, mask builders). A one-layer, 64-wide BERT takes 0.83 ms a text through it on this
project's build machine and 0.36 ms here (benchmarks/lean_forward.py, BENCHMARKS.md), and a served student answers
one text at a time as often as not. The teacher gets the same path when it is a BERT (an ``hf:`` classifier or an
``embed:`` sentence encoder), so a report's latency ratio compares like with like.

:func:`classifier_logits` and :func:`encoder_states` return the lean function when the model is a BERT they cover
(absolute positions, an encoder without cross-attention, one of the activations below), else the model's own
forward: a model they do not cover still answers, as transformers computes it. The lean path reads the model's
own parameter tensors (no copy), so it follows the model's device and dtype.

:func:`encode` is the tokenizing half: what ``tokenizer(texts, padding=True, truncation=True, max_length=L,
return_tensors="pt")`` returns, through a fast tokenizer's Rust backend directly, without ``__call__``'s argument
handling and BatchEncoding: one text 0.091 -> 0.053 ms, and a one-layer student's whole answer to it 0.548 -> 0.419
ms (benchmarks/lean_forward.py's tokenizer table).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["classifier_logits", "encode", "encoder_states", "lean_reason"]

Forward = Callable[..., torch.Tensor]  # f(**a tokenizer's output): input_ids, attention_mask, token_type_ids

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _bilstm(model: Any) -> Forward:
    """A protege-bilstm student's logits (students/bilstm.py) in evaluation mode. Texts without padding (one text
    at a time, as a served student mostly answers) go through both LSTMs in one fused bidirectional call, whose
    backward half reads each text from its end as the model's reversal within the text does, and the plain mean
    and max; a padded batch goes through the model's own forward."""
    fw, bw = model.forward_lstm, model.backward_lstm
    weights = [fw.weight_ih_l0, fw.weight_hh_l0, fw.bias_ih_l0, fw.bias_hh_l0,
               bw.weight_ih_l0, bw.weight_hh_l0, bw.bias_ih_l0, bw.bias_hh_l0]  # the model's own tensors, no copy
    scale = math.sqrt(model.config.hidden_size)

    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None and not bool(attention_mask.all()):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits
        x = model.embeddings(input_ids) * scale  # (B, T, H)
        h0 = x.new_zeros(2, x.shape[0], fw.hidden_size)
        states = torch.lstm(x, (h0, h0), weights, True, 1, 0.0, False, True, True)[0]  # (B, T, 2H)
        pooled = torch.cat([states.mean(1), states.amax(1)], -1)  # (B, 4H)
        return model.classifier(torch.relu(model.dense(pooled)))

    return logits


def lean_reason(model: Any) -> str | None:
    """Why the lean path does not cover ``model`` (None: it does)."""
    bert = getattr(model, "bert", model)
    config = getattr(bert, "config", None)
    if config is None or getattr(config, "model_type", None) not in ("bert", "protege-bert") or not hasattr(
        bert, "encoder"
    ):
        return f"{type(model).__name__} is not a BERT"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "a BERT decoder"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {config.position_embedding_type!r}"
    if not isinstance(config.hidden_act, str) or config.hidden_act not in _ACTIVATIONS:
        return f"hidden_act {config.hidden_act!r}"
    if getattr(config, "chunk_size_feed_forward", 0):
        return "a chunked feed-forward"
    if model is not bert and (not hasattr(model, "classifier") or getattr(bert, "pooler", None) is None):
        return "a classifier without BERT's pooler and linear head"
    if model.training:
        return "a model in training mode (dropout)"
    return None


# model -> (what the function was made for, the function): made once per model, so that timing one text at a time
# does not time the making; made again when the model switches between training and evaluation
_MADE: weakref.WeakKeyDictionary[Any, tuple[tuple[str, bool], Forward]] = weakref.WeakKeyDictionary()


def _once(model: Any, kind: str, make: Callable[[], Forward]) -> Forward:
    key = (kind, bool(model.training))
    made = _MADE.get(model)
    if made is None or made[0] != key:
        made = _MADE[model] = (key, make())
    return made[1]


def encoder_states(model: Any) -> Forward:
    """last_hidden_state (B, T, H) of an encoder (lean for a ``BertModel``; None from a model whose output has
    none): ``f(**encoded)``."""
    def make() -> Forward:
        if lean_reason(model) is not None:
            return lambda **enc: getattr(model(**enc), "last_hidden_state", None)
        return _Encoder(model)

    return _once(model, "encoder", make)


def classifier_logits(model: Any) -> Forward:
    """Logits (B, C) of a sequence classifier (lean for a ``BertForSequenceClassification``): ``f(**encoded)``."""
    return _once(model, "classifier", lambda: _classifier(model))


def _classifier(model: Any) -> Forward:
    if getattr(model.config, "model_type", None) == "protege-bilstm" and not model.training:
        return _bilstm(model)
    if lean_reason(model) is not None:
        return lambda **enc: model(**enc).logits
    encoder, pooler, head = _Encoder(model.bert), model.bert.pooler.dense, model.classifier
    mean = getattr(model.config, "pooling", "cls") == "mean"  # a protege-bert (students/mean_pool.py)
    bag = bool(getattr(model.config, "ngram_buckets", 0))  # with an n-gram bag beside the encoder
    from .students.mean_pool import mean_of_tokens, mix_logits

    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = encoder(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        if not mean:
            read = h[:, 0]  # (B, H): the first token
        elif attention_mask is None or bool(attention_mask.all()):  # one text, or none padded: one op, not seven
            read = h.mean(1)
        else:
            read = mean_of_tokens(h, attention_mask)  # the unpadded tokens' mean
        pooled = torch.tanh(F.linear(read, pooler.weight, pooler.bias))  # (B, H): BertPooler
        logits = F.linear(pooled, head.weight, head.bias)  # (B, C)
        if bag:
            return mix_logits(logits, model.ngram_logits(input_ids, attention_mask), model.ngram_share)
        return logits

    return logits


class _Encoder:
    """BertEmbeddings + BertEncoder in evaluation mode (post-LayerNorm layers, scaled dot-product attention)."""

    def __init__(self, bert: Any):
        c = bert.config
        self.eps, self.heads = c.layer_norm_eps, c.num_attention_heads
        self.act = _ACTIVATIONS[c.hidden_act]
        e = bert.embeddings
        self.words, self.positions = e.word_embeddings.weight, e.position_embeddings.weight
        self.types = e.token_type_embeddings.weight if getattr(e, "token_type_embeddings", None) is not None else None
        self.norm = (e.LayerNorm.weight, e.LayerNorm.bias)
        self.layers = []
        for layer in bert.encoder.layer:
            a = layer.attention
            self.layers.append((
                a.self.query, a.self.key, a.self.value, a.output.dense, a.output.LayerNorm,
                layer.intermediate.dense, layer.output.dense, layer.output.LayerNorm,
            ))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        h = F.embedding(input_ids, self.words) + self.positions[:T]  # (B, T, H)
        if self.types is not None:
            h = h + (self.types[0] if token_type_ids is None else F.embedding(token_type_ids, self.types))
        h = F.layer_norm(h, h.shape[-1:], *self.norm, self.eps)
        H = h.shape[-1]
        d = H // self.heads
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): a query reads the unpadded keys
        for q, k, v, o, norm1, up, down, norm2 in self.layers:
            def split(x: torch.Tensor) -> torch.Tensor:
                return x.view(B, T, self.heads, d).transpose(1, 2)  # (B, heads, T, d)

            ctx = F.scaled_dot_product_attention(
                split(F.linear(h, q.weight, q.bias)), split(F.linear(h, k.weight, k.bias)),
                split(F.linear(h, v.weight, v.bias)), attn_mask=mask, scale=1 / math.sqrt(d),
            )  # (B, heads, T, d)
            ctx = ctx.transpose(1, 2).reshape(B, T, H)
            h = F.layer_norm(F.linear(ctx, o.weight, o.bias) + h, (H,), norm1.weight, norm1.bias, self.eps)
            ff = F.linear(self.act(F.linear(h, up.weight, up.bias)), down.weight, down.bias)
            h = F.layer_norm(ff + h, (H,), norm2.weight, norm2.bias, self.eps)
        return h


# --------------------------------------------------------------------------------------------------------------
# tokenizing

Encode = Callable[[Sequence[str]], dict[str, torch.Tensor]]

# tokenizer -> {max_length: its encode function}: the backend is copied once per tokenizer and length
_ENCODERS: weakref.WeakKeyDictionary[Any, dict[int, Encode]] = weakref.WeakKeyDictionary()


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """``dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))``,
    the same tensors under the same names (the tokenizer's ``model_input_names``), made by its Rust backend
    directly when it is a fast tokenizer with a pad token; through ``__call__`` otherwise."""
    made = _ENCODERS.setdefault(tokenizer, {})
    fn = made.get(max_length)
    if fn is None:
        fn = made[max_length] = _encoder(tokenizer, max_length)
    return fn(texts)


def _encoder(tokenizer: Any, max_length: int) -> Encode:
    def call(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))

    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or tokenizer.pad_token_id is None:
        return call  # a slow tokenizer, or one that cannot pad (its __call__ says so for a batch)
    from tokenizers import Tokenizer

    # A copy set up as transformers sets up the shared backend on every call (set_truncation_and_padding), so
    # the tokenizer itself is left as it was.
    rust = Tokenizer.from_str(backend.to_str())
    rust.enable_truncation(max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side)
    rust.enable_padding(direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                        pad_type_id=tokenizer.pad_token_type_id, pad_token=tokenizer.pad_token)
    names = tuple(tokenizer.model_input_names)
    fields = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}
    if not set(names) <= fields.keys():
        return call  # an input the backend's Encoding does not carry

    def fast(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if not texts:
            return call(texts)
        encs = [rust.encode(texts[0])] if len(texts) == 1 else rust.encode_batch(list(texts))
        return {n: torch.tensor([getattr(e, fields[n]) for e in encs], dtype=torch.long) for n in names}

    return fast
