"""A bidirectional LSTM text classifier: the small student of Tang et al. (2019), "Distilling task-specific
knowledge from BERT into simple neural networks".

Word pieces -> embeddings (scaled by sqrt(width), as a Transformer's) -> one LSTM reading the text forward and one
reading it backward -> the mean and the max of their states over the text -> a ReLU layer -> the labels. A
one-layer attention student pools what each token looks like next to the others; the two LSTMs read the text in
order, so a clause after "but" or a word after "not" changes the state that follows it. On SST-2 the same 64-wide
student kept more of its teacher than every lever of the one-layer encoder (BENCHMARKS.md, SST-2).

The backward LSTM reads each text reversed within its own length (``reverse_within``), so padding comes after the
text in both directions and a text's answer does not depend on what it is batched with; no packed sequences, so
torch.export traces it (the ONNX export). Texts must be padded on the right: protege sets the student's tokenizer
to pad on the right when it builds one, and the saved tokenizer keeps that.

Saved as model type ``protege-bilstm`` with this file beside it (``auto_map``), so
``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`` loads it anywhere. This module
imports only torch and transformers: transformers copies it into every saved student directory.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "protege-bilstm"


class BiLstmConfig(PretrainedConfig):
    """``hidden_size``: the width of the word embeddings and of each direction's LSTM state; ``head_size``: the
    ReLU layer's width; ``initializer_range``: the word embeddings' starting standard deviation."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 30522, hidden_size: int = 64, head_size: int = 64,
                 dropout: float = 0.1, initializer_range: float | None = None, pad_token_id: int = 0, **kwargs):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.head_size = head_size
        self.dropout = dropout
        self.initializer_range = hidden_size**-0.5 if initializer_range is None else initializer_range


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, H) with each row's first ``lengths[b]`` positions in reverse order and the rest (padding) left
    in place; applied twice it gives ``x`` back."""
    pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, T)
    n = lengths.unsqueeze(1)  # (B, 1)
    idx = torch.where(pos < n, n - 1 - pos, pos)  # (B, T)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class BiLstmForSequenceClassification(PreTrainedModel):
    config_class = BiLstmConfig
    base_model_prefix = "bilstm"
    main_input_name = "input_ids"

    def __init__(self, config: BiLstmConfig):
        super().__init__(config)
        h = config.hidden_size
        self.embeddings = torch.nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.forward_lstm = torch.nn.LSTM(h, h, batch_first=True)
        self.backward_lstm = torch.nn.LSTM(h, h, batch_first=True)
        self.dropout = torch.nn.Dropout(config.dropout)
        self.dense = torch.nn.Linear(4 * h, config.head_size)
        self.classifier = torch.nn.Linear(config.head_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # the word embeddings at the config's scale (projected or distilled ones are copied over them); the LSTMs
        # and linear layers keep torch's own uniform(+-1/sqrt(fan)) start, which suits their widths
        if isinstance(module, torch.nn.Embedding):
            module.weight.data.normal_(0.0, self.config.initializer_range)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.embeddings = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                **kwargs) -> SequenceClassifierOutput:
        """Logits (B, C) for word-piece ids (B, T) padded on the right; ``token_type_ids`` (from BERT tokenizers)
        are ignored."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.dropout(self.embeddings(input_ids) * math.sqrt(self.config.hidden_size))  # (B, T, H)
        lengths = attention_mask.long().sum(1)  # (B,)
        ahead, _ = self.forward_lstm(x)  # (B, T, H): state t has read tokens 0..t
        back, _ = self.backward_lstm(reverse_within(x, lengths))
        states = torch.cat([ahead, reverse_within(back, lengths)], -1)  # (B, T, 2H); back: tokens t..end read
        m = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        mean = (states * m).sum(1) / m.sum(1).clamp_min(1.0)
        top = states.masked_fill(m == 0, torch.finfo(states.dtype).min).amax(1)
        top = top.masked_fill(lengths.unsqueeze(1) == 0, 0.0)  # a row of padding alone: no state, no max
        logits = self.classifier(self.dropout(torch.relu(self.dense(torch.cat([mean, top], -1)))))  # (B, C)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


_registered = False


def register() -> None:
    """Let the Auto classes load ``protege-bilstm`` students (once; later calls do nothing)."""
    global _registered
    if _registered:
        return
    AutoConfig.register(MODEL_TYPE, BiLstmConfig)
    AutoModelForSequenceClassification.register(BiLstmConfig, BiLstmForSequenceClassification)
    BiLstmConfig.register_for_auto_class()
    BiLstmForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    _registered = True
