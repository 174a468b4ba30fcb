"""Resuming an interrupted audit (issue 13): every finished attack call is kept in a journal beside
--out; the command killed with SIGKILL at seeded random numbers of finished calls, then run again,
ends with exactly the uninterrupted result; a changed configuration refuses to mix (exit 2, nothing
touched); --resume without a journal and --fresh behave as their help says; Ctrl-C says how to resume.

Each run is a fresh `python -m robustlab` process (about 3 s of imports), so the CLI tests are slow.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import robustlab
from robustlab import journal
from robustlab.attacks.base import AttackOutcome
from robustlab.attacks.cascade import CascadeOutcome
from robustlab.errors import InputError
from robustlab.results import load
from support import digits_model, digits_test

SEED = 13  # the kill points are drawn from it, so a failure can be replayed
AUDIT = ["--n", "24", "--attack", "fgsm,pgd,mifgsm", "--steps", "40", "--eps", "0.05,0.1,0.2", "--suite", "quick",
         "--checks", "default"]


# ---------------------------------------------------------------------------- the journal's own pieces
def _outcome(dtype: torch.dtype) -> AttackOutcome:
    g = torch.Generator().manual_seed(0)
    return AttackOutcome(attack="pgd", norm="linf", eps=0.1, x_adv=torch.rand(5, 1, 8, 8, generator=g).to(dtype),
                         adv_pred=torch.tensor([1, 2, 3, 4, 5]), adv_confidence=torch.rand(5, generator=g),
                         success=torch.tensor([True, False, True, False, False]), l2=torch.rand(5, generator=g),
                         linf=torch.rand(5, generator=g), targets=None, gradient_calls=40, seconds=0.25,
                         batch_size=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_unit_round_trips_bit_for_bit_without_pickle(dtype):
    outcome = _outcome(dtype)
    back = journal.decode(journal.encode(outcome))
    assert type(back) is AttackOutcome
    for name in ("x_adv", "adv_pred", "adv_confidence", "success", "l2", "linf"):
        a, b = getattr(outcome, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert (back.attack, back.eps, back.targets, back.gradient_calls, back.seconds) == ("pgd", 0.1, None, 40, 0.25)


def test_a_cascade_unit_keeps_who_broke_each_sample():
    base = _outcome(torch.float32)
    cascade = CascadeOutcome(**{**base.__dict__, "attack": "cascade", "targets": torch.tensor([0, 1, 2, 3, 4])},
                             broken_by=["apgd-ce", "", "square", "", ""], member_seconds={"apgd-ce": 0.1})
    back = journal.decode(journal.encode(cascade))
    assert type(back) is CascadeOutcome and back.broken_by == cascade.broken_by
    assert back.member_seconds == {"apgd-ce": 0.1} and torch.equal(back.targets, cascade.targets)


def test_the_journal_lives_beside_the_results_directory(tmp_path):
    assert journal.journal_dir(tmp_path / "audit") == tmp_path / ".audit.robustlab-journal"


# ---------------------------------------------------------------------------- through the Python API
def test_an_api_audit_resumes_from_its_journal_with_the_same_result(tmp_path, caplog):
    model, data = digits_model(), digits_test(24)
    options = dict(attacks=["fgsm", "pgd"], eps=[0.05, 0.1], steps=10, suite="none", checks="none", n=24)
    reference = robustlab.audit(model, data, **options)
    first = robustlab.audit(model, data, **options, journal=tmp_path / "j")
    units = sorted((tmp_path / "j" / "units").glob("*.npz"))
    assert len(units) == 4  # 2 attacks x 2 eps
    units[1].write_bytes(b"damaged")  # a damaged unit is recomputed, never trusted
    before = {u.name: (u.stat().st_mtime_ns, u.read_bytes()) for u in units}
    with caplog.at_level(logging.INFO, logger="robustlab"):
        again = robustlab.audit(model, data, **options, journal=tmp_path / "j")
    assert "4 attack calls already finished" in caplog.text and "unreadable" in caplog.text
    after = {u.name: (u.stat().st_mtime_ns, u.read_bytes()) for u in units}
    reused = [name for name in before if after[name] == before[name]]
    assert reused == [u.name for i, u in enumerate(units) if i != 1]  # read back, not recomputed and rewritten
    assert after[units[1].name][1] != b"damaged"  # the damaged one was recomputed and stored again
    for result in (first, again):
        assert result.samples.equals(reference.samples)
        assert result.summary.drop(columns="seconds").equals(reference.summary.drop(columns="seconds"))
    with pytest.raises(InputError, match=r"another configuration \(differs in: config\.eps\)"):
        robustlab.audit(model, data, **{**options, "eps": [0.05, 0.2]}, journal=tmp_path / "j")


# ---------------------------------------------------------------------------- the command line, killed
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("resume")
    save_file({k: v.contiguous() for k, v in digits_model().state_dict().items()}, str(folder / "w.safetensors"))
    test = digits_test(24)
    np.savez(folder / "test.npz", x=test.x.numpy(), y=test.y.numpy())
    return {"folder": folder, "weights": folder / "w.safetensors", "test": folder / "test.npz"}


def _command(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "robustlab", "audit", "--model", "robustlab.zoo:DigitsCNN", "--weights",
            str(files["weights"]), "--data", str(files["test"]), *AUDIT, *extra, "--out", str(out)]


def _environment(folder: Path) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                ROBUSTLAB_CACHE=str(folder / "cache"))


def _units(out: Path) -> int:
    return len(list((journal.journal_dir(out) / "units").glob("*.npz")))


def _run(command: list[str], env: dict[str, str], code: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


def _interrupt_at(command: list[str], env: dict[str, str], out: Path, units: int, how: signal.Signals) -> int:
    """Start the audit and send `how` once the journal holds `units` finished calls; how many it held then."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and _units(out) < units and time.monotonic() < deadline:
        time.sleep(0.001)
    assert process.poll() is None, f"the audit finished before {units} units: {process.communicate()[1][-2000:]}"
    process.send_signal(how)
    process.communicate(timeout=120)
    assert not (out / "results.json").exists(), "a killed run wrote results"
    return _units(out)


def _same_result(out: Path, reference: Path) -> None:
    got, expected = load(out), load(reference)
    assert got.verified is True
    assert got.samples.equals(expected.samples)
    assert got.summary.drop(columns="seconds").equals(expected.summary.drop(columns="seconds"))
    checks = lambda r: [{k: v for k, v in c.items() if k != "seconds"} for c in r.metadata["checks"]["results"]]
    assert checks(got) == checks(expected)
    assert Path(out, "examples.npz").read_bytes() == Path(reference, "examples.npz").read_bytes()


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_result(files, tmp_path):
    env = _environment(tmp_path)
    reference = tmp_path / "reference"
    _run(_command(files, reference, "--quiet"), env)
    assert not journal.journal_dir(reference).exists()  # removed once the results are saved
    total = _units_of_a_whole_run(files, env, tmp_path)
    out = tmp_path / "out"
    kept = 0
    for target in sorted(np.random.default_rng(SEED).choice(np.arange(1, total - 1), size=3, replace=False)):
        target = max(int(target), kept + 1)
        if target >= total:
            break
        kept = _interrupt_at(_command(files, out, "--quiet"), env, out, target, signal.SIGKILL)
        assert kept >= target and not out.exists()
    assert kept >= 1
    done = _run(_command(files, out), env)  # the same command, not quiet: it says it resumes
    assert f"resuming the interrupted audit in {journal.journal_dir(out)}: {kept} attack calls already finished" \
        in done.stderr
    _same_result(out, reference)
    assert not journal.journal_dir(out).exists()
    assert [p.name for p in tmp_path.iterdir() if ".robustlab-" in p.name] == []


def _units_of_a_whole_run(files, env, tmp_path) -> int:
    """How many attack calls the audit makes. A finished CLI run removes its journal; an API audit with
    the same configuration keeps its own, with one unit per call."""
    probe = tmp_path / "count"
    robustlab.audit(digits_model(), digits_test(24), attacks=["fgsm", "pgd", "mifgsm"], eps=[0.05, 0.1, 0.2],
                    steps=40, suite="quick", checks="default", n=24, journal=probe)
    count = len(list((probe / "units").glob("*.npz")))
    assert count >= 10
    return count


@pytest.mark.slow
def test_a_changed_configuration_is_refused_and_touches_nothing(files, tmp_path):
    env = _environment(tmp_path)
    out = tmp_path / "out"
    kept = _interrupt_at(_command(files, out, "--quiet"), env, out, 2, signal.SIGKILL)
    where = journal.journal_dir(out)
    before = {p.relative_to(where): p.read_bytes() for p in where.rglob("*") if p.is_file()}
    done = _run([*_command(files, out, "--quiet"), "--eps", "0.3"], env, code=2)
    assert f"{where} holds an interrupted audit of another configuration (differs in: config.eps)" in done.stderr
    assert "--fresh" in done.stderr and not out.exists()
    assert {p.relative_to(where): p.read_bytes() for p in where.rglob("*") if p.is_file()} == before
    assert len(before) == kept + 1  # the manifest and the units

    fresh = _run([*_command(files, out, "--fresh"), "--eps", "0.3"], env)  # --fresh starts over
    assert "resuming" not in fresh.stderr and load(out).verified and not where.exists()


@pytest.mark.slow
def test_resume_without_an_interrupted_audit_is_an_error(files, tmp_path):
    env = _environment(tmp_path)
    out = tmp_path / "out"
    done = _run(_command(files, out, "--quiet", "--resume"), env, code=2)
    assert done.stderr == (f"robustlab audit: error: --resume: there is no interrupted audit to resume "
                           f"({journal.journal_dir(out)} does not exist)\n")
    assert not out.exists() and not journal.journal_dir(out).exists()
    both = _run(_command(files, out, "--resume", "--fresh"), env, code=2)
    assert "not allowed with argument" in both.stderr


@pytest.mark.slow
def test_ctrl_c_after_finished_calls_says_how_to_resume(files, tmp_path):
    env = _environment(tmp_path)
    out = tmp_path / "out"
    process = subprocess.Popen(_command(files, out, "--quiet"), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and _units(out) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    kept = _units(out)
    assert stderr == (f"robustlab audit: interrupted; nothing was saved ({out} was not written); {kept} finished "
                      f"attack calls are kept in {journal.journal_dir(out)}: run the same command again to resume\n")
    resumed = _run(_command(files, out, "--resume"), env)
    assert f"{kept} attack calls already finished" in resumed.stderr and load(out).verified
