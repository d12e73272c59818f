"""A BERT sequence classifier that pools the mean of its tokens' last states instead of the first token's.

A one-layer scratch student reads the whole text only through its last layer's states; with BERT's pooler it
classifies from the [CLS] state alone, which has had a single attention step to gather the text. The mean over
the text's tokens (padding excluded) gives the head every token's state; on SST-2 the same student agreed with
its teacher more on the held-out teacher-labelled slice (BENCHMARKS.md, SST-2, "Later run: mean pooling ...").

The weights are BERT's, with BERT's pooler (dense + tanh) and head on the pooled mean. The model type is its own,
``protege-bert``, so that plain transformers cannot load it as a [CLS] classifier and silently predict otherwise:
protege registers it (:func:`register`), and a saved student carries this file with an ``auto_map``, so
``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`` (and the tokenizer with the
same flag) loads it anywhere.

With ``ngram_buckets`` the student has a second, linear member: a bag of its word pieces and of hashed pairs of
neighbouring pieces (fastText without a hidden layer), one row of logits each, averaged over the text. The two are
trained apart, each on the teacher's labels (``member_logits``), and the model answers with their mixture,
``(1 - s) p_encoder + s p_bag``, the share s (the buffer ``ngram_share``) chosen on held-out teacher-labelled rows
during training. A lexical model errs elsewhere than the encoder, so the mixture agrees with the teacher more
than either (BENCHMARKS.md, SST-2, "an n-gram bag beside the student").

This module imports only torch and transformers: transformers copies it into every saved student directory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "protege-bert"
PAIR_HASH = 1_000_003  # a pair (a, b) of word-piece ids goes to row vocab_size + (a * PAIR_HASH + b) % (buckets - vocab)


class MeanPoolBertConfig(BertConfig):
    model_type = MODEL_TYPE

    def __init__(self, pooling: str = "mean", ngram_buckets: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.pooling = pooling
        self.ngram_buckets = ngram_buckets


@dataclass
class MixedClassifierOutput(SequenceClassifierOutput):
    """``logits``: log of the members' mixture (a softmax of them is the mixture); ``member_logits``: the
    encoder's and the bag's own logits, each (B, C), what training fits to the teacher one by one."""

    member_logits: tuple[torch.FloatTensor, ...] | None = None


def ngram_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int,
               buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n-gram bag's rows (B, 2T - 1) and their weights (B, 2T - 1) for a batch of word-piece ids (B, T): each
    piece is its own row (its id), each pair of neighbours a row past the vocabulary by hash; a weight is 1 over
    the text's count of unpadded unigrams and pairs (0 where padding is involved), so the bag is their mean."""
    a, b = input_ids[:, :-1], input_ids[:, 1:]
    rows = torch.cat([input_ids, vocab_size + (a * PAIR_HASH + b) % (buckets - vocab_size)], 1)
    m = torch.ones_like(input_ids, dtype=torch.float32) if attention_mask is None else attention_mask.float()
    w = torch.cat([m, m[:, :-1] * m[:, 1:]], 1)
    return rows, w / w.sum(1, keepdim=True).clamp_min(1.0)


def mix_logits(encoder: torch.Tensor, bag: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """log((1 - share) softmax(encoder) + share softmax(bag)), (B, C); exact at share 0 and 1."""
    share = share.to(encoder.dtype)
    return torch.logaddexp(torch.log1p(-share) + torch.log_softmax(encoder, -1),
                           torch.log(share) + torch.log_softmax(bag, -1))


def mean_of_tokens(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H) mean of ``states`` (B, T, H) over the positions ``attention_mask`` (B, T) marks (all when None).

    No branch on the mask's values, so torch.export traces it (the ONNX export); the lean path takes the plain mean
    itself when nothing is padded."""
    if attention_mask is None:
        return states.mean(1)
    m = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


class MeanPoolBertForSequenceClassification(BertForSequenceClassification):
    config_class = MeanPoolBertConfig

    def __init__(self, config: MeanPoolBertConfig):
        super().__init__(config)
        buckets = getattr(config, "ngram_buckets", 0)
        if buckets:
            if buckets <= config.vocab_size:
                raise ValueError(f"ngram_buckets ({buckets}) must exceed vocab_size ({config.vocab_size}): the "
                                 "word pieces take the first rows, pairs the rest")
            # (rows, C) from zero, as a linear model starts, and drawn from no random stream: the encoder trains
            # exactly as it would alone (same dropout masks)
            self.ngrams = torch.nn.Embedding.from_pretrained(torch.zeros(buckets, config.num_labels), freeze=False)
            self.ngram_bias = torch.nn.Parameter(torch.zeros(config.num_labels))
            self.register_buffer("ngram_share", torch.tensor(0.0))  # chosen in training, saved with the weights

    def ngram_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, C) logits of the n-gram bag alone."""
        rows, w = ngram_rows(input_ids, attention_mask, self.config.vocab_size, self.config.ngram_buckets)
        return (self.ngrams(rows) * w.unsqueeze(-1).to(self.ngrams.weight.dtype)).sum(1) + self.ngram_bias

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None, **kwargs):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, **kwargs)
        pooled = mean_of_tokens(out.last_hidden_state, attention_mask)  # (B, H)
        pooled = self.bert.pooler.activation(self.bert.pooler.dense(pooled))
        logits = self.classifier(self.dropout(pooled))  # (B, C)
        members = None
        if getattr(self.config, "ngram_buckets", 0):
            members = (logits, self.ngram_logits(input_ids, attention_mask))
            logits = mix_logits(*members, self.ngram_share)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return MixedClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                     attentions=out.attentions, member_logits=members)


_registered = False


def register() -> None:
    """Let the Auto classes load ``protege-bert`` students (once; later calls do nothing)."""
    global _registered
    if _registered:
        return
    AutoConfig.register(MODEL_TYPE, MeanPoolBertConfig)
    AutoModelForSequenceClassification.register(MeanPoolBertConfig, MeanPoolBertForSequenceClassification)
    MeanPoolBertConfig.register_for_auto_class()
    MeanPoolBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    _registered = True
