"""The `load` command a defended model's JSON prints is one a user can paste: run from the directory the audit
ran in, it loads exactly the saved weights (issue 20: it repeated --weights and dropped the models/ path)."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from robustlab.cli import main
from support import digits_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_printed_load_command_loads_the_defended_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "cache"))
    save_file({k: v.contiguous() for k, v in digits_model().state_dict().items()}, "base.safetensors")
    fast = ["--attack", "fgsm", "--suite", "none", "--checks", "none", "--eps", "0.1", "--n", "20", "--quiet"]
    code = main(["audit", "--model", "robustlab.zoo:digits_cnn", "--weights", "base.safetensors", "--out", "audit",
                 "--mean", "0.5", "--std", "0.25", "--defend", "distillation", "--defend-epochs", "1",
                 "--train-data", "digits:train", *fast])
    assert code == 0
    about = json.loads((tmp_path / "audit" / "models" / "distillation.json").read_text())
    command = about["load"]
    words = shlex.split(command)
    assert words[:2] == ["robustlab", "audit"] and words.count("--weights") == 1, command
    assert words[words.index("--weights") + 1] == "audit/models/distillation.safetensors", command
    assert words[words.index("--mean") + 1] == "0.5" and words[words.index("--std") + 1] == "0.25", command
    assert "--bounds" not in words  # the default 0,1
    # run it as printed (plus where to write and a small audit), from where the user is
    run = subprocess.run([sys.executable, "-m", "robustlab", *words[1:], "--out", "again", *fast],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (loaded,) = json.loads((tmp_path / "again" / "results.json").read_text())["metadata"]["models"].values()
    weights = (tmp_path / "audit" / "models" / "distillation.safetensors").read_bytes()
    assert loaded["sha256"] == hashlib.sha256(weights).hexdigest()  # the audited file is the saved one
    assert loaded["mean"] == [0.5] and loaded["std"] == [0.25]
