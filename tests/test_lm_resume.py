"""kill -9 in the middle of training, then the same command again: it resumes from the last checkpoint and ends
with the same loss and weights as a run that was never interrupted."""

from __future__ import annotations

import json
import sys

import torch
from lm_fixtures import FIXTURES, kill_at_checkpoint, make_llama, make_tokenizer, run_spec, save_model


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    from safetensors.torch import load_file

    tok = make_tokenizer()
    teacher = save_model(tmp_path / "teacher", make_llama(tok, layers=4, seed=0), tok)
    spec = {
        "teacher": str(teacher),
        # LoRA dropout draws random numbers every step: resuming must restore the RNG state too
        "student": {"init": "teacher_layers", "keep_layers": [0, 3], "lora_r": 4, "lora_dropout": 0.1},
        "training": {"batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 8, "checkpoint_every": 2,
                     "learning_rate": 1e-2, "warmup_fraction": 0.25},
        "rows": 8,
    }
    ref = run_spec({**spec, "out": str(tmp_path / "ref")}, tmp_path, "ref", [sys.executable])
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "run"
    ckpt = tmp_path / "run.checkpoint"
    path = tmp_path / "slow.json"
    path.write_text(json.dumps({**spec, "out": str(out), "slow_s": 0.5}))
    saved_at = kill_at_checkpoint([sys.executable, str(FIXTURES), str(path)], ckpt)
    assert 2 <= saved_at < 8 and not out.exists()

    again = run_spec({**spec, "out": str(out)}, tmp_path, "again", [sys.executable])
    assert again.returncode == 0, again.stderr[-3000:]
    meta, ref_meta = (json.loads((d / "protege.json").read_text()) for d in (out, tmp_path / "ref"))
    assert meta["resumed_from_step"] == saved_at and ref_meta["resumed_from_step"] == 0
    assert not ckpt.exists()  # removed after the final save
    logs = [[json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()] for d in (out, tmp_path / "ref")]
    assert [r["step"] for r in logs[0]] == list(range(1, 9))  # the log of the steps before the kill came back too
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert meta["final_loss"] == ref_meta["final_loss"]
    resumed, uninterrupted = (load_file(d / "model.safetensors") for d in (out, tmp_path / "ref"))
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)
