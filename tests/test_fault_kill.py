"""The fault test (issues 14 and 19): the command line killed (SIGKILL) at seeded random points of an
audit and of defense training, and interrupted (SIGINT, a Ctrl-C). The results directory is at every
moment absent, the previous complete result, or the new complete one, never a mix; training resumes
from its last complete checkpoint; the next run is correct; a Ctrl-C is one line and exit status 130.

Each run is a fresh `python -m robustlab` process (about 3 s of imports each), so the file is slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.torch import save_file

from robustlab.results import load
from support import digits_model, digits_test

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

AUDIT = ["--n", "24", "--attack", "fgsm,pgd", "--steps", "5", "--eps", "0.1", "--suite", "none", "--checks", "none",
         "--quiet"]
SEED = 19  # the kill times are drawn from it, so a failure can be replayed


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A module:factory model that loads the suite's digits CNN (and marks its first forward pass), its
    weights, 24 test samples and a small training set."""
    folder = tmp_path_factory.mktemp("fault")
    weights = folder / "w.safetensors"
    save_file({k: v.contiguous() for k, v in digits_model().state_dict().items()}, str(weights))
    (folder / "faultnet.py").write_text(textwrap.dedent(f"""
        import os
        from safetensors.torch import load_file
        from robustlab.zoo import DigitsCNN

        class Marked(DigitsCNN):
            def forward(self, x):
                marker = os.environ.get("FAULT_MARKER")
                if marker and not os.path.exists(marker):
                    open(marker, "w").close()
                return super().forward(x)

        def build():
            net = Marked()
            net.load_state_dict(load_file({str(weights)!r}))
            return net
    """))
    test = digits_test(24)
    np.savez(folder / "test.npz", x=test.x.numpy(), y=test.y.numpy())
    from robustlab.data import digits_split

    train = digits_split("train")
    np.savez(folder / "train.npz", x=train.x[:120].numpy(), y=train.y[:120].numpy())
    return {"folder": folder, "model": folder / "faultnet.py", "test": folder / "test.npz",
            "train": folder / "train.npz"}


def _command(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "robustlab", "audit", "--model", f"{files['model']}:build", "--data",
            str(files["test"]), *AUDIT, *extra, "--out", str(out)]


def _environment(folder: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                ROBUSTLAB_CACHE=str(folder / "cache"), **extra)


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> bool:
    """SIGKILL `process` as soon as `ready()` (polled every millisecond); False if it finished first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.kill()
            process.communicate()
            return True
        time.sleep(0.001)
    process.kill()
    process.communicate()
    return False


def _staging(out: Path) -> bool:
    return any(p.name.startswith(f".{out.name}.robustlab-new-") for p in out.parent.iterdir())


def _assert_whole(out: Path, reference: Path) -> str:
    """`out` is absent or a complete, verified result equal to the reference run's."""
    if not out.exists():
        assert not (out.parent / f"{out.name}.tmp").exists()
        return "absent"
    result = load(out)  # refuses a mixed or incomplete directory
    assert result.verified is True
    expected = load(reference)
    assert result.samples.equals(expected.samples)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    return "complete"


def test_sigkill_during_an_audit_never_leaves_a_partial_or_mixed_result(files, tmp_path):
    env = _environment(tmp_path)
    reference = tmp_path / "reference"
    started = time.monotonic()
    _run(_command(files, reference), env)
    duration = time.monotonic() - started
    out = tmp_path / "out"
    begun = [0.0]  # when the current run started
    moments: list[tuple[str, Callable[[], bool]]] = [("while the new directory is being written", lambda: _staging(out))]
    for fraction in sorted(np.random.default_rng(SEED).uniform(0.25, 1.0, size=2)):
        moments.append((f"at {fraction:.0%} of a run",
                        lambda f=fraction: time.monotonic() - begun[0] >= f * duration))
    seen = []
    for label, ready in moments:
        begun[0] = time.monotonic()
        killed = _kill_when(_start(_command(files, out), env), ready)
        seen.append((label, killed, _assert_whole(out, reference)))
    assert seen[0][1], "the kill during the save did not happen"
    assert seen[0][2] == "absent"  # killed before the swap: nothing of that run is visible
    done = _run(_command(files, out), env)  # the next run is correct
    assert _assert_whole(out, reference) == "complete" and "Traceback" not in done.stderr
    assert [p.name for p in tmp_path.iterdir() if ".robustlab-" in p.name] == []  # the killed runs' copies: gone
    print("kills:", seen)

    before = {p.name: p.read_bytes() for p in out.iterdir()}  # killed over a previous result: it stays whole
    assert _kill_when(_start(_command(files, out), env), lambda: _staging(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and load(out).verified


def test_ctrl_c_prints_one_line_exits_130_and_saves_nothing(files, tmp_path):
    env = _environment(tmp_path, FAULT_MARKER=str(tmp_path / "forward"))
    out = tmp_path / "out"
    process = _start(_command(files, out, "--attack", "pgd", "--steps", "400"), env)
    deadline = time.monotonic() + 300
    while not (tmp_path / "forward").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # inside the audit by now
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr == f"robustlab audit: interrupted; nothing was saved ({out} was not written); run the command " \
                     "again to redo the audit\n"
    assert "Traceback" not in stdout and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".robustlab-" in p.name] == []


def test_sigkill_during_defense_training_resumes_to_the_same_model(files, tmp_path):
    """Killed while it writes the checkpoint of epoch 2 (before: the next run mixed epoch-2 state with
    epoch-3 weights), then at a random moment; the resumed run ends with the model of an uninterrupted
    run, bit for bit."""
    defend = ["--defend", "pgd-at", "--defend-epochs", "3", "--train-data", str(files["train"])]
    reference = tmp_path / "reference"
    _run(_command(files, reference, *defend), _environment(tmp_path / "fresh"))

    env = _environment(tmp_path)
    cache = tmp_path / "cache" / "defenses"
    out = tmp_path / "out"

    def writing_epoch_2() -> bool:
        return any(p.name == "weights-2.safetensors" for p in cache.glob("pgd-at-*/*"))

    assert _kill_when(_start(_command(files, out, *defend), env), writing_epoch_2)
    assert not out.exists()
    rng = np.random.default_rng(SEED)
    begun, after = time.monotonic(), float(rng.uniform(1.0, 4.0))
    _kill_when(_start(_command(files, out, *defend), env), lambda: time.monotonic() - begun >= after)
    assert not out.exists() or load(out).verified
    _run(_command(files, out, *defend), env)
    assert (out / "models" / "pgd-at.safetensors").read_bytes() == \
        (reference / "models" / "pgd-at.safetensors").read_bytes()
    assert load(out).verified
