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

This module imports only torch and transformers: transformers copies it into every saved student directory.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "protege-bert"


class MeanPoolBertConfig(BertConfig):
    model_type = MODEL_TYPE

    def __init__(self, pooling: str = "mean", **kwargs):
        super().__init__(**kwargs)
        self.pooling = pooling


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

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None, **kwargs):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, **kwargs)
        pooled = mean_of_tokens(out.last_hidden_state, attention_mask)  # (B, H)
        pooled = self.bert.pooler.activation(self.bert.pooler.dense(pooled))
        logits = self.classifier(self.dropout(pooled))  # (B, C)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)


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
