"""The command line: demo, audit of user models, thresholds, exit codes, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from robustlab.cli import main
from support import Softmaxed, digits_model, digits_test

QUICK = ["--attack", "fgsm,pgd", "--suite", "none", "--eps", "0.05,0.1", "--steps", "5", "--n", "30", "--quiet"]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "digits-net.pt"
    torch.jit.trace(digits_model(), digits_test().x[:2]).save(str(path))
    return str(path)


def test_demo_writes_results_and_prints_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "20", "--quiet", "--defend", "none", "--explain", "none",
                 "--suite", "quick"]) == 0
    printed = capsys.readouterr().out
    assert "worst-case" in printed and "eps=0.05" in printed and "eps=0.2" in printed
    summary = json.loads((out / "results.json").read_text())["summary"]
    # pgd-margin: the integrity checks' margin-loss PGD, always run with checks on; cascade-quick:
    # the --suite (the default, standard, is the "cascade" row; too slow for this test)
    assert {r["attack"] for r in summary} == {"fgsm", "pgd", "cw", "cascade-quick", "pgd-margin", "worst-case"}
    assert {r["eps"] for r in summary if r["eps"] is not None} == {0.05, 0.1, 0.2}
    cached = tmp_path / "cache" / "digits-cnn-v2.safetensors"
    first = json.loads((out / "results.json").read_text())["metadata"]["models"]["digits-cnn"]["sha256"]
    stamp = cached.stat().st_mtime_ns
    # the second run reuses the cached model: same file, same hash, no retraining
    assert main(["demo", "--out", str(out), "--n", "5", "--quiet", "--defend", "none", "--explain", "none",
                 "--suite", "none"]) == 0
    again = json.loads((out / "results.json").read_text())["metadata"]["models"]["digits-cnn"]["sha256"]
    assert again == first and cached.stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["summary"][0]["n"] == 5


def test_audit_torchscript_with_thresholds(scripted, tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["audit", "--model", scripted, "--data", "digits", "--out", str(out), *QUICK,
                 "--fail-under", "robust_accuracy=0.01", "--fail-under", "clean_accuracy=0.9"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pass  robust_accuracy >= 0.01" in printed
    meta = json.loads((out / "results.json").read_text())["metadata"]
    assert "digits-net" in meta["models"]
    code = main(["audit", "--model", scripted, "--out", str(out), *QUICK, "--fail-under", "robust_accuracy=0.99@0.1"])
    assert code == 1
    assert "FAIL  robust_accuracy >= 0.99 at eps=0.1" in capsys.readouterr().out


def test_audit_factory_weights_npz_names_and_classes(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in digits_model().state_dict().items()}, str(tmp_path / "w.safetensors"))
    d = digits_test(30)
    np.savez(tmp_path / "d.npz", x=d.x.numpy(), y=d.y.numpy())
    classes = ",".join(f"digit-{i}" for i in range(10))
    out = tmp_path / "r"
    code = main(["audit", "--model", "robustlab.zoo:digits_cnn", "--weights", str(tmp_path / "w.safetensors"),
                 "--data", str(tmp_path / "d.npz"), "--out", str(out), "--name", "mine", "--classes", classes,
                 "--targeted", "next", "--eps", "8/255", "--attack", "pgd", "--steps", "3", "--quiet",
                 "--suite", "quick"])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["metadata"]["models"]["mine"]["classes"][3] == "digit-3"
    assert doc["summary"][0]["eps"] == pytest.approx(8 / 255)
    assert doc["summary"][0]["targeted"] == "next"


@pytest.mark.parametrize("extra, match", [
    (["--eps", "-0.1"], "eps"),
    (["--eps", "8"], "8/255"),
    (["--attack", "deepfool"], "unknown attack"),
    (["--bounds", "1,0"], "bounds"),
    (["--fail-under", "speed=3"], "unknown metric"),
    (["--targeted", "sideways"], "unknown mode"),
    (["--steps", "0"], "--steps"),
])
def test_bad_usage_exits_2_and_writes_nothing(scripted, tmp_path, capsys, extra, match):
    out = tmp_path / "never"
    code = _run(["audit", "--model", scripted, "--out", str(out), "--n", "10", "--quiet", *extra])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_bad_data_and_models_exit_2(scripted, tmp_path, capsys):
    d = digits_test(10)
    bad = {"nan.npz": (np.where(np.arange(d.x.numel()).reshape(d.x.shape) == 5, np.nan, d.x.numpy()), d.y.numpy()),
           "labels.npz": (d.x.numpy(), d.y.numpy() + 10),
           "range.npz": (d.x.numpy() * 255, d.y.numpy())}
    for name, (x, y) in bad.items():
        np.savez(tmp_path / name, x=x, y=y)
    probs = tmp_path / "probs.pt"
    torch.jit.trace(Softmaxed(digits_model()).eval(), d.x[:2]).save(str(probs))
    pickled = tmp_path / "pickled.pt"
    torch.save(digits_model(), str(pickled))
    cases = [
        (["--model", scripted, "--data", str(tmp_path / "nan.npz")], "NaN"),
        (["--model", scripted, "--data", str(tmp_path / "labels.npz")], "[0, 9]"),
        (["--model", scripted, "--data", str(tmp_path / "range.npz")], "outside the bounds"),
        (["--model", str(probs)], "probabilities"),
        (["--model", str(pickled)], "--trust-pickle"),
        (["--model", str(tmp_path / "missing.pt")], "not found"),
        (["--model", "robustlab.zoo:digits_cnn", "--weights", str(tmp_path / "nan.npz")], "weights"),
    ]
    for args, match in cases:
        out = tmp_path / "never"
        assert _run(["audit", *args, "--out", str(out), "--n", "10", "--quiet"]) == 2, args
        assert match in capsys.readouterr().err, args
        assert not out.exists()


def test_trusted_pickle_is_loaded_when_asked(tmp_path):
    pickled = tmp_path / "pickled.pt"
    torch.save(digits_model(), str(pickled))
    assert _run(["audit", "--model", str(pickled), "--trust-pickle", "--out", str(tmp_path / "r"), *QUICK]) == 0


def test_console_script_help_and_version():
    exe = os.path.join(os.path.dirname(sys.executable), "robustlab")
    done = subprocess.run([exe, "audit", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--fail-under" in done.stdout and "ONNX is not supported yet" in done.stdout
    done = subprocess.run([exe, "audit", "--model"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)
