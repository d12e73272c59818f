"""Training: the distillation losses and one loop per student kind.

``losses`` (pure functions of tensors), ``classifier`` (an encoder student on label distributions), ``lm`` (a
causal-LM student on the teacher's text, logits or top-k, on Accelerate).
"""

