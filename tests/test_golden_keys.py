"""Users' stores stay valid: the rendered requests and cache keys of a few requests are pinned.

A rerun must make zero calls against a store written by an earlier version, so neither the rendered request
nor the key derived from it may change when code moves. The hashes below were computed before the package was
restructured (issue 11); if one changes, every user's cache silently misses.
"""

from __future__ import annotations

import pytest

from protege._io import content_hash
from protege.labeling.data import Example
from protege.labeling.labeler import requests_for
from protege.recipe import Recipe
from protege.store import call_key
from protege.teachers import make_teacher

TEXT = "My card was charged twice for order #1234, please refund one of them."


def _recipe(**sections) -> Recipe:
    return Recipe.model_validate(sections)


CASES = {
    "classify-openai-logprobs": (
        dict(task={"labels": {"billing": "charges, refunds", "shipping": "delivery", "technical": ""}},
             teacher={"model": "openai:gpt-4o-mini", "provider": "openai"}),
        "83291b817034fc1e2e3edb392bfbc3bb75d15fe56a2dd6bb52a712ecec1b30f4",
        "bb57ab04a7d463d80d7897856f2bd2d0321b3628ec9537b9c3aafeddb44c6177",
    ),
    "classify-anthropic-rationale": (
        dict(task={"labels": ["billing", "shipping"]},
             teacher={"model": "anthropic:claude-haiku-4-5", "label_method": "hard_label", "rationale": True}),
        "bb8ad0fddbe6ade1f694b0661bfbb25aef1c1e9464f5f9df491caddfeb2e6192",
        "864d1d3f561bb12edace7dfb057481c98c2de08539ec33dc117bc3146183f2f4",
    ),
    "classify-openai-samples": (
        dict(task={"labels": ["negative", "positive"]},
             teacher={"model": "openai:deepseek-chat", "provider": "deepseek", "label_method": "samples",
                      "n_samples": 5}),
        "30d724f7f18e09924fa8e3c5102abc38f848eae5aa22e3b60d391210ab21507c",
        "876a16fbd9d75cdbf5e89e1d752bfe9e30a3a50dc98ffe66da587d97b7d1fe24",
    ),
    "generate-openai-topk": (
        dict(task={"kind": "generation", "instruction": "Answer the question."},
             teacher={"model": "openai:gpt-4o-mini", "provider": "openai", "top_logprobs": 5},
             student={"model": "gpt2"}),
        "3cb6408bf165b9a058ba45b7f9acffdb76583211fd511e6fd096e3c5bd10a766",
        "35a7e81fb451acb42941e9f622daa3ab32ec7b65f4c12a8efa7d383029fdcfc1",
    ),
    "generate-anthropic-rationale": (
        dict(task={"kind": "generation", "instruction": "Solve it.", "answer_format": "rationale"},
             teacher={"model": "anthropic:claude-haiku-4-5", "max_tokens": 300},
             student={"model": "gpt2"}),
        "2751d3a5913eb50af74f04d8c5a796b63c2047dd0fb5b879c9faf1ca92a6c8ae",
        "cdd1c138c2a5de9376ad3b640e2bd2ada74a50d77cb432a813ace5a1ae954647",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_requests_and_cache_keys_do_not_change(name):
    sections, req_hash, key = CASES[name]
    recipe = _recipe(**sections)
    (request,) = requests_for(recipe, [Example(id="0", text=TEXT, gold=None, where="golden:1")])
    teacher = make_teacher(recipe.teacher)
    assert content_hash(request.to_json()) == req_hash
    assert call_key(teacher.identity, request.to_json()) == key


def test_the_packaged_lm_teachers_key_does_not_change(tmp_path):
    """The packaged local LM teacher (the demo's before it had an embedding teacher): its identity includes the
    weights' fingerprint and its calibration."""
    old_demo_labels = {  # the demo's task before its descriptions were rewritten: the pinned request is this one
        "billing": "charges, invoices, refunds, payment methods, pricing",
        "shipping": "delivery status, tracking, lost or late or damaged packages, addresses",
        "technical": "the app or website crashes, errors, bugs, login or performance problems",
        "account": "changing email, password, profile, username, two-factor, data export",
        "cancellation": "cancel a subscription or an order, close the account, stop renewal",
    }
    recipe = _recipe(
        task={"instruction": "Classify the customer support message by its intent.", "labels": old_demo_labels},
        teacher={"model": "hf:smollm2-135m-instruct", "batch_size": 8, "calibrate": True},
    )
    (request,) = requests_for(recipe, [Example(id="0", text=TEXT, gold=None, where="golden:1")])
    assert content_hash(request.to_json()) == "083a07b73cfceae7703d9784c67c57738596d05abe1b67c13ecb7a3532528c5d"
    key = call_key(make_teacher(recipe.teacher).identity, request.to_json())
    assert key == "aa2f694c16297b559d87b1260fc888e8af3e7a0fae789ad4c0e99d170cd37070"
