"""Saves that are all or nothing (issue 19): a results directory is written in full beside the target
and swapped in, records a digest of every file it ships, and is refused when its files do not match;
training checkpoints commit with a manifest written last. The SIGKILL version is tests/test_fault_kill.py."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import robustlab
from robustlab import atomic
from robustlab.cli import main
from robustlab.errors import InputError
from robustlab.results import AuditResult, UnverifiedResultsWarning, load
from support import digits_model, digits_test

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def results() -> tuple[AuditResult, AuditResult]:
    """Two different results: `a` with examples and an extra table, `b` with neither."""
    data = digits_test().head(12)
    a = robustlab.audit(digits_model(), data, attacks=["fgsm"], eps=[0.1], suite="none", checks="none",
                        progress=False)
    a.tables["extra"] = pd.DataFrame({"k": [1, 2]})
    b = robustlab.audit(digits_model(), data, attacks=["fgsm"], eps=[0.05, 0.2], suite="none", checks="none",
                        progress=False)
    b.examples = {}
    return a, b


def _listing(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def _hidden_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".robustlab-" in p.name]


def test_save_records_a_digest_of_every_file_and_load_verifies_them(results, tmp_path):
    a, _ = results
    previous = os.umask(0o022)
    try:
        a.save(tmp_path / "r")
    finally:
        os.umask(previous)
    out = tmp_path / "r"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # mkdtemp's 0700 before
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())
    files = json.loads((out / "results.json").read_text())["files"]
    assert sorted(files) == ["examples.npz", "extra.csv", "samples.csv"]
    assert all(files[name] == atomic.sha256(out / name) for name in files)
    loaded = load(out)
    assert loaded.verified is True
    assert loaded.summary["robust_accuracy"].tolist() == a.summary["robust_accuracy"].tolist()
    assert _hidden_leftovers(tmp_path) == []


def test_a_reused_directory_holds_exactly_the_new_result(results, tmp_path):
    """Before: files were moved in one by one, so examples.npz and extra.csv of the first run stayed."""
    a, b = results
    out = tmp_path / "r"
    a.save(out)
    b.save(out)
    assert _listing(out) == ["results.json", "samples.csv"]
    assert sorted(load(out).summary["eps"].unique()) == [0.05, 0.2]
    assert _hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_a_crash_while_saving_leaves_the_old_complete_result(results, tmp_path, monkeypatch, exchange):
    a, b = results
    out = tmp_path / "r"
    a.save(out)
    before = {p: p.read_bytes() for p in out.iterdir()}
    if not exchange:
        monkeypatch.setattr(atomic, "exchange", lambda x, y: False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # what a Ctrl-C half way through the save looks like

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash)  # after results.json is written into the new copy
    with pytest.raises(KeyboardInterrupt):
        b.save(out)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    assert _hidden_leftovers(tmp_path) == []
    if not exchange:
        monkeypatch.setattr(atomic, "exchange", lambda x, y: False)
    b.save(out)  # and the next save is complete
    assert _listing(out) == ["results.json", "samples.csv"] and load(out).verified


def test_the_rename_aside_fallback_interrupted_between_its_renames(results, tmp_path, monkeypatch):
    """Without renameat2: a crash after the old directory was renamed aside leaves no target; load
    says where the previous results are, and the next save replaces them and cleans up."""
    a, b = results
    out = tmp_path / "r"
    a.save(out)
    monkeypatch.setattr(atomic, "exchange", lambda x, y: False)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # 1: staging -> target (refused, not empty), 2: target -> aside, 3: staging -> target
            raise SystemExit("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    monkeypatch.setattr(atomic, "_alive", lambda pid: True)  # "another process": its leftovers are kept
    with pytest.raises(SystemExit):
        b.save(out)
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert not out.exists()
    with pytest.raises(InputError, match="interrupted save left the previous results in .*robustlab-old"):
        load(out)
    aside = atomic.interrupted_swap(out)
    assert aside is not None and load(aside).verified
    monkeypatch.setattr(atomic, "_alive", lambda pid: False)  # that process is gone now
    b.save(out)
    assert load(out).verified and _hidden_leftovers(tmp_path) == []


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(results, tmp_path):
    a, _ = results
    dead = _dead_pid()
    (tmp_path / f".r.robustlab-new-{dead}-0abc").mkdir()
    (tmp_path / f".r.robustlab-old-{dead}-0abc").mkdir()
    (tmp_path / f".r.robustlab-new-{os.getppid()}-0abc").mkdir()  # a live process (pytest's parent)
    (tmp_path / f".other.robustlab-new-{dead}-0abc").mkdir()  # another target's
    a.save(tmp_path / "r")
    assert sorted(_hidden_leftovers(tmp_path)) == [f".other.robustlab-new-{dead}-0abc",
                                                    f".r.robustlab-new-{os.getppid()}-0abc"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------------------- mixed and tampered directories
def _mix_samples(out: Path, a: Path, b: Path) -> None:
    shutil.copy(b / "samples.csv", out / "samples.csv")  # the samples of another run


def _drop_examples(out: Path, a: Path, b: Path) -> None:
    (out / "examples.npz").unlink()


def _add_examples(out: Path, a: Path, b: Path) -> None:
    shutil.copy(a / "examples.npz", out / "examples.npz")  # out is b, saved without examples


def _edit_table(out: Path, a: Path, b: Path) -> None:
    with open(out / "extra.csv", "a") as handle:
        handle.write("3\n")


def _escape(out: Path, a: Path, b: Path) -> None:
    document = json.loads((out / "results.json").read_text())
    document["files"]["../outside.csv"] = document["files"].pop("samples.csv")
    (out / "results.json").write_text(json.dumps(document))


TAMPERED = [
    ("samples-from-another-run", _mix_samples, "samples.csv does not match the digest"),
    ("examples-missing", _drop_examples, "lists examples.npz, which is missing"),
    ("stray-examples", _add_examples, "holds examples.npz, which results.json does not list"),
    ("table-edited", _edit_table, "extra.csv does not match the digest"),
    ("digest-outside-the-directory", _escape, "lists a file outside the directory"),
]


@pytest.mark.parametrize("name, damage, words", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_mixed_or_tampered_directories_are_refused_by_load_report_and_compare(results, tmp_path, capsys, name,
                                                                              damage, words):
    a, b = results
    out, saved_a, saved_b = tmp_path / "r", tmp_path / "a", tmp_path / "b"
    (a if name != "stray-examples" else b).save(out)
    a.save(saved_a)
    b.save(saved_b)
    damage(out, saved_a, saved_b)
    with pytest.raises(InputError) as refused:
        load(out)
    assert refused.value.argument == "results" and words in str(refused.value)
    for command in (["report", str(out)], ["compare", str(saved_a), str(out), "-o", str(tmp_path / "c.md")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"robustlab {command[0]}: error: results: ") and words in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "c.md").exists() and not (out / "report.html").exists()


def test_results_without_digests_load_unverified_and_say_so(results, tmp_path, capsys):
    a, _ = results
    out = tmp_path / "r"
    a.save(out)
    document = json.loads((out / "results.json").read_text())
    del document["files"]  # as robustlab wrote them before digests
    (out / "results.json").write_text(json.dumps(document))
    with pytest.warns(UnverifiedResultsWarning, match="without file digests"):
        loaded = load(out)
    assert loaded.verified is False and len(loaded.summary) == len(a.summary)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedResultsWarning)  # the CLI says it in one line instead
        assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("robustlab report: note: ") and "without file digests" in err and err.count("\n") == 1
    assert "files" not in json.loads((out / "results.json").read_text())  # not blessed by a re-render


def test_report_rerendered_into_the_directory_records_its_digest(results, tmp_path, capsys):
    a, _ = results
    out = tmp_path / "r"
    a.save(out)
    inode = (out / "samples.csv").stat().st_ino
    assert main(["report", str(out)]) == 0
    files = json.loads((out / "results.json").read_text())["files"]
    assert {"report.html", "summary.md"} <= set(files) and files["report.html"] == atomic.sha256(out / "report.html")
    assert load(out).verified
    assert (out / "samples.csv").stat().st_ino == inode  # the other files were linked, not rewritten
    assert main(["report", str(out), "-o", str(tmp_path / "elsewhere.html")]) == 0
    assert (tmp_path / "elsewhere.html").exists() and load(out).verified
    assert _hidden_leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- checkpoints
def _small(train, n=192):
    from robustlab.data import Dataset

    return Dataset(train.x[:n], train.y[:n], "small", indices=train.indices[:n])


@pytest.fixture(scope="module")
def training():
    from robustlab.data import digits_split

    train, test = digits_split("train"), digits_split("test")
    val = test.head(48)
    return _small(train), dict(method="pgd", eps=0.1, steps=2, lr=3e-3, batch_size=64, val_data=val, seed=0)


def test_a_crash_between_checkpoint_writes_resumes_from_the_previous_epoch(training, tmp_path, monkeypatch):
    """Before: weights.safetensors of epoch 3 was in place when the crash hit before state.json, and the
    resumed run mixed epoch-3 weights with the epoch-2 optimiser (a different model, no warning)."""
    from robustlab.defenses import adversarial
    from robustlab.defenses.adversarial import adversarial_training
    from robustlab.training import seeded_init
    from robustlab.zoo import DigitsCNN

    data, options = training
    straight = adversarial_training(seeded_init(DigitsCNN, 0), data, epochs=3, **options)

    real, written = adversarial._write_part, []

    def crash_in_epoch_3(path, payload):
        if os.path.basename(path).startswith("optimiser-3"):  # weights-3 and best-3 already written
            raise KeyboardInterrupt
        written.append(os.path.basename(path))
        real(path, payload)

    monkeypatch.setattr(adversarial, "_write_part", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        adversarial_training(seeded_init(DigitsCNN, 0), data, epochs=3, checkpoint_dir=tmp_path, **options)
    monkeypatch.undo()
    assert "weights-3.safetensors" in written and json.loads((tmp_path / "state.json").read_text())["epoch"] == 2
    lines: list[str] = []
    resumed = adversarial_training(seeded_init(DigitsCNN, 1), data, epochs=3, checkpoint_dir=tmp_path,
                                   progress=lines.append, **options)
    assert "resuming from" in " ".join(lines) and "after epoch 2" in " ".join(lines)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert sorted(os.listdir(tmp_path)) == ["best-3.safetensors", "optimiser-3.pt", "state.json",
                                            "weights-3.safetensors"]


def test_a_checkpoint_that_does_not_match_its_manifest_is_refused(training, tmp_path):
    from robustlab.defenses.adversarial import adversarial_training
    from robustlab.training import seeded_init
    from robustlab.zoo import DigitsCNN

    data, options = training
    adversarial_training(seeded_init(DigitsCNN, 0), data, epochs=1, checkpoint_dir=tmp_path, **options)
    (tmp_path / "optimiser-1.pt").write_bytes((tmp_path / "optimiser-1.pt").read_bytes()[:-8])
    with pytest.raises(InputError) as refused:
        adversarial_training(seeded_init(DigitsCNN, 0), data, epochs=2, checkpoint_dir=tmp_path, **options)
    assert refused.value.argument == "checkpoint_dir"
    assert "optimiser-1.pt does not match the digest state.json records" in str(refused.value)
    (tmp_path / "weights-1.safetensors").unlink()
    with pytest.raises(InputError, match="incomplete: weights-1.safetensors"):
        adversarial_training(seeded_init(DigitsCNN, 0), data, epochs=2, checkpoint_dir=tmp_path, **options)


def test_an_old_checkpoint_without_a_manifest_restarts_loudly(training, tmp_path):
    from robustlab.defenses.adversarial import adversarial_training
    from robustlab.model import RobustlabWarning
    from robustlab.training import seeded_init
    from robustlab.zoo import DigitsCNN

    data, options = training
    (tmp_path / "state.json").write_text(json.dumps({"epoch": 1, "config": {}, "history": []}))
    (tmp_path / "weights.safetensors").write_bytes(b"old")
    lines: list[str] = []
    with pytest.warns(RobustlabWarning, match="training starts again from epoch 0"):
        model = adversarial_training(seeded_init(DigitsCNN, 0), data, epochs=1, checkpoint_dir=tmp_path,
                                     progress=lines.append, **options)
    assert [h["epoch"] for h in model.training_history] == [1]
    assert any("without a manifest" in line for line in lines)
    assert "weights.safetensors" not in os.listdir(tmp_path)  # replaced by the verified format
    assert np.isfinite(model.training_history[0]["loss"])


def test_the_cli_names_the_final_directory_not_the_new_copy(tmp_path, capsys, monkeypatch):
    """The report and summary are rendered into the new copy before the swap; what they say names OUT."""
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.pt"
    torch.jit.trace(digits_model(), digits_test().x[:2]).save(str(model))
    np.savez(tmp_path / "d.npz", x=digits_test().x[:8].numpy(), y=digits_test().y[:8].numpy())
    out = Path("out")
    for _ in range(2):  # a fresh directory, then over the previous result
        assert main(["audit", "--model", str(model), "--data", str(tmp_path / "d.npz"), "--n", "8", "--attack",
                     "fgsm", "--eps", "0.1", "--suite", "none", "--checks", "none", "--quiet", "--out", str(out)]) == 0
        assert "Full report: `out/report.html`" in (out / "summary.md").read_text()
        assert all(".robustlab-" not in p.read_text(errors="replace") for p in out.iterdir())
        assert load(out).verified and _hidden_leftovers(tmp_path) == []
    assert "report: out/report.html" in capsys.readouterr().out
