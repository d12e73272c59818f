"""Two CPU processes (gloo, DDP through Accelerate, launched by torchrun) train to the same per-step losses and
weights as one process with the same global batch: the loss is normalized by the target tokens of the whole
step across processes, and the processes' gradients are averaged by DDP."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from lm_fixtures import run_spec, split_spec


def test_two_processes_match_one(tmp_path):
    from safetensors.torch import load_file

    spec = split_spec(tmp_path, max_steps=4)
    one = run_spec({**spec, "out": str(tmp_path / "one")}, tmp_path, "one", [sys.executable])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_spec(
        {**spec, "out": str(tmp_path / "two")}, tmp_path, "two",
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    )
    assert two.returncode == 0, two.stderr[-3000:]

    meta = {n: json.loads((tmp_path / n / "protege.json").read_text()) for n in ("one", "two")}
    assert meta["one"]["processes"] == 1 and meta["two"]["processes"] == 2
    logs = {n: [json.loads(x) for x in (tmp_path / n / "train_log.jsonl").read_text().splitlines()] for n in meta}
    assert len(logs["one"]) == len(logs["two"]) == 4
    for a, b in zip(logs["one"], logs["two"]):
        assert a["target_tokens"] == b["target_tokens"]
        for key in ("loss", "ce_loss", "kd_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a, b)
    assert logs["one"][-1]["loss"] < logs["one"][0]["loss"]  # it trained
    w1, w2 = (load_file(tmp_path / n / "model.safetensors") for n in ("one", "two"))
    for name, value in w1.items():
        # gradients agree to float rounding (summed in another order); Adam divides by sqrt(v), so a gradient
        # near zero can turn that rounding into a visible step: 1e-4 is 1% of one step at lr 1e-2
        torch.testing.assert_close(w2[name], value, rtol=1e-4, atol=1e-4)
