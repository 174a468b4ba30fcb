"""Adversarial training under torchrun (2 processes, gloo on CPU) equals the one-process run.

Each rank attacks half of every global batch and DDP averages the gradients, with the loss scaled
so the average is the gradient of the whole batch: the weights after two epochs must match the
one-process run up to float rounding, and the validation figures (sharded, counts summed) exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "distributed"))

from train_pgd_at import train  # noqa: E402


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "distributed" / "train_pgd_at.py"), str(out / "model"), str(out / "checkpoints")],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out / "model.safetensors")), json.loads((out / "model.json").read_text())


def test_two_processes_match_one(distributed_run, tmp_path):
    weights, defense = distributed_run
    single = train(None)
    assert defense["processes"] == 2 and single.defense["processes"] == 1
    for name, value in single.state_dict().items():
        assert torch.allclose(weights[name], value, atol=2e-5, rtol=1e-4), name
    for a, b in zip(defense["history"], single.defense["history"]):
        assert a["clean_accuracy"] == b["clean_accuracy"]
        assert a["robust_accuracy"] == pytest.approx(b["robust_accuracy"], abs=1 / 90 + 1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert defense["best_epoch"] in (1, 2)
