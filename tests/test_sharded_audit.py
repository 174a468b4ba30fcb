"""A sharded audit (issue 13): `torchrun --nproc_per_node 2 -m robustlab audit ...` on two gloo
processes writes the same results as one process, bit for bit per sample, with the integrity checks on;
rank 0 alone writes; the split hands ranks whole batches of the one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from robustlab.distributed import Group
from robustlab.results import load
from support import digits_model, digits_test

AUDIT = ["--samples", "30", "--attack", "fgsm,pgd", "--steps", "10", "--eps", "0.05,0.1", "--suite", "quick",
         "--checks", "default", "--batch-size", "8", "--quiet"]


@pytest.mark.parametrize("n, batch, world", [(30, 8, 2), (30, 8, 3), (7, 8, 2), (64, 1, 5), (100, 7, 4)])
def test_ranks_get_contiguous_whole_batches_covering_every_sample(n, batch, world):
    blocks = [Group(rank=r, world=world, device=None).block(n, batch) for r in range(world)]  # type: ignore[arg-type]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    for (a, b), (c, _) in zip(blocks, blocks[1:]):
        assert b == c  # contiguous, in rank order
    for a, b in blocks:
        assert (a % batch == 0 or a == b == n) and (b % batch == 0 or b == n)  # whole batches (or none)
    sizes = [-(-(b - a) // batch) for a, b in blocks]
    assert max(sizes) - min(sizes) <= 1


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("sharded")
    save_file({k: v.contiguous() for k, v in digits_model().state_dict().items()}, str(folder / "w.safetensors"))
    test = digits_test(30)
    np.savez(folder / "test.npz", x=test.x.numpy(), y=test.y.numpy())
    env = dict(_environment(), ROBUSTLAB_CACHE=str(folder / "cache"))
    command = ["-m", "robustlab", "audit", "--model", "robustlab.zoo:DigitsCNN", "--weights",
               str(folder / "w.safetensors"), "--data", str(folder / "test.npz"), *AUDIT]
    one = subprocess.run([sys.executable, *command, "--out", str(folder / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *command, "--out", str(folder / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    return folder / "one", folder / "two", two


@pytest.mark.slow
def test_two_gloo_processes_give_one_process_results_bit_for_bit(runs):
    one, two, _ = runs
    a, b = load(one), load(two)
    assert a.verified and b.verified
    rows = a.samples.groupby(["attack", "eps"]).size()
    assert (rows == 30).all() and {"fgsm", "pgd", "cascade-quick", "worst-case", "probe:square"} <= set(
        a.samples.attack)  # the checks' probes are sharded too
    assert a.samples.equals(b.samples)  # every per-sample figure, exactly
    assert a.summary.drop(columns="seconds").equals(b.summary.drop(columns="seconds"))
    untimed = lambda r: [{k: v for k, v in c.items() if k != "seconds"} for c in r.metadata["checks"]["results"]]
    assert untimed(a) == untimed(b) and len(untimed(a)) >= 5
    assert Path(one, "examples.npz").read_bytes() == Path(two, "examples.npz").read_bytes()
    assert b.metadata["shards"] == {"world_size": 2, "backend": "gloo"} and "shards" not in a.metadata


@pytest.mark.slow
def test_a_sharded_run_resumes_a_killed_one_process_audit(runs):
    """The journal does not depend on the process count: two ranks continue what one process began."""
    one, _, _ = runs
    folder = one.parent
    env = dict(_environment(), ROBUSTLAB_CACHE=str(folder / "cache"))
    command = ["-m", "robustlab", "audit", "--model", "robustlab.zoo:DigitsCNN", "--weights",
               str(folder / "w.safetensors"), "--data", str(folder / "test.npz"), *AUDIT, "--out",
               str(folder / "three")]
    units = folder / ".three.robustlab-journal" / "units"
    process = subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and len(list(units.glob("*.npz"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert process.poll() is None, "the audit finished before it could be killed"
    process.kill()
    process.wait()
    kept = len(list(units.glob("*.npz")))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *[c for c in command if c != "--quiet"]], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{kept} attack calls already finished" in done.stderr
    assert load(folder / "three").samples.equals(load(one).samples)
    assert not units.parent.exists()


@pytest.mark.slow
def test_rank_zero_alone_writes_and_speaks(runs):
    one, two, done = runs
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [p.name for p in two.parent.iterdir() if ".robustlab-" in p.name] == []  # no journal, no staging left
    assert done.stdout.count("Integrity checks (default)") == 1  # the tables once, from rank 0
    assert "Traceback" not in done.stderr
    assert json.loads(Path(two, "results.json").read_text())["metadata"]["shards"]["world_size"] == 2
