"""`--defend`: defended copies trained, saved under OUT/models/, audited side by side, resumable."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from robustlab.cli import main
from robustlab.defenses.recipes import fresh_copy, parse_defenses, split_validation
from robustlab.data import digits_split
from robustlab.errors import InputError
from robustlab.loading import load_model
from robustlab.model import state_dict_sha256
from robustlab.zoo import DigitsCNN
from support import digits_model, digits_test

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--attack", "fgsm,pgd", "--suite", "none", "--eps", "0.1,0.2", "--steps", "5", "--n", "40", "--quiet",
        "--defend-epochs", "2", "--train-data", "digits:train"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("w") / "digits.safetensors"
    save_file({k: v.contiguous() for k, v in digits_model().state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def defended_run(weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("defend")
    cache = root / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("ROBUSTLAB_CACHE", str(cache))
    out = root / "out"
    try:
        code = main(["audit", "--model", "robustlab.zoo:digits_cnn", "--weights", weights, "--out", str(out),
                     "--name", "plain", "--defend", "pgd-at,distillation,ensemble", *FAST])
    finally:
        mp.undo()
    assert code == 0
    return out, cache


def test_defended_models_are_audited_saved_and_reloadable(defended_run, weights):
    out, _ = defended_run
    doc = json.loads((out / "results.json").read_text())
    models = doc["metadata"]["models"]
    assert set(models) == {"plain", "pgd-at", "distillation", "ensemble", "ensemble-vote"}
    assert "defense" not in models["plain"]
    assert models["pgd-at"]["defense"]["method"] == "pgd" and models["pgd-at"]["defense"]["eps"] == 0.2
    assert models["distillation"]["defense"]["temperature"] == 20.0
    assert models["ensemble-vote"]["defense"]["combine"] == "vote"
    assert {r["model"] for r in doc["summary"]} == set(models)
    vote_rows = [r for r in doc["summary"] if r["model"] == "ensemble-vote"]
    assert vote_rows and all(r.get("note") == "transfer from surrogate" for r in vote_rows)
    for name in models:
        if name == "plain":
            continue
        assert (out / "models" / f"{name}.safetensors").exists()
        about = json.loads((out / "models" / f"{name}.json").read_text())
        assert about["defense"]["defense"] in ("adversarial-training", "distillation", "ensemble")
        assert about["base_sha256"] == models["plain"]["sha256"]
    # the saved adversarially trained weights are the audited ones, and load with the base factory
    reloaded = load_model("robustlab.zoo:digits_cnn", weights=str(out / "models" / "pgd-at.safetensors"),
                          name="again")
    assert state_dict_sha256(reloaded.module) == models["pgd-at"]["sha256"]
    html = (out / "report.html").read_text()
    assert "Defenses: what each bought" in html and "PGD-AT" in html
    # --suite none: no figure is established, so no defense "bought" its change; each change is marked
    assert "not a bought gain" in html and "bought +" not in html and "bought -" not in html
    assert not list(out.glob(".*tmp*")) and not list((out / "models").glob("*.tmp"))


def test_second_run_reuses_finished_training(defended_run, weights, tmp_path, monkeypatch, capsys):
    out, cache = defended_run
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(cache))
    first = json.loads((out / "results.json").read_text())["metadata"]["models"]
    again = tmp_path / "again"
    args = ["audit", "--model", "robustlab.zoo:digits_cnn", "--weights", weights, "--out", str(again),
            "--name", "plain", "--defend", "pgd-at,distillation,ensemble", *[a for a in FAST if a != "--quiet"]]
    assert main(args) == 0
    messages = capsys.readouterr().err
    assert "resuming from" in messages and "reusing" in messages and "training" not in messages.replace(
        "adversarial training", "")
    second = json.loads((again / "results.json").read_text())["metadata"]["models"]
    for name in first:
        assert second[name]["sha256"] == first[name]["sha256"], name


@pytest.mark.parametrize("extra, match", [
    (["--defend", "magic"], "unknown defense magic"),
    (["--defend", "pgd-at", "--defend-epochs", "0"], "--defend-epochs"),
    (["--defend", "pgd-at", "--train-data", "nowhere.npz"], "train-data"),
    (["--defend", "pgd-at", "--attack", "deepfool"], "unknown attack"),  # audit options checked before training
    (["--defend", "pgd-at", "--eps", "3"], "eps"),
    (["--explain", "colours"], "unknown explanation"),
])
def test_bad_defense_options_exit_2_and_write_nothing(weights, tmp_path, capsys, extra, match):
    out = tmp_path / "never"
    try:
        code = main(["audit", "--model", "robustlab.zoo:digits_cnn", "--weights", weights, "--out", str(out),
                     "--quiet", *extra])
    except SystemExit as stop:  # usage errors leave through argparse's exit
        code = stop.code
    assert code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_torchscript_model_cannot_be_defended(tmp_path, capsys):
    path = tmp_path / "net.pt"
    torch.jit.trace(digits_model(), digits_test().x[:2]).save(str(path))
    out = tmp_path / "never"
    assert main(["audit", "--model", str(path), "--out", str(out), "--defend", "pgd-at", "--quiet"]) == 2
    assert "TorchScript" in capsys.readouterr().err and not out.exists()


def test_fresh_copy_reinitialises_and_leaves_the_original_alone():
    original = digits_model()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    a, b = fresh_copy(original, 3), fresh_copy(original, 3)
    for k, v in original.state_dict().items():
        assert torch.equal(v, before[k])
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])
        assert not torch.equal(a.state_dict()[k], v)

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))
            self.net = DigitsCNN()

        def forward(self, x):
            return self.net(x) * self.scale

    with pytest.raises(InputError, match="scale"):
        fresh_copy(Custom(), 0)


def test_validation_split_is_stratified_disjoint_and_seeded():
    data = digits_split("train")
    train, val = split_validation(data, seed=0)
    assert len(train) + len(val) == len(data)
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert set(val.y.tolist()) == set(range(10))
    assert torch.equal(split_validation(data, seed=0)[1].indices, val.indices)
    assert parse_defenses("all") == ["pgd-at", "fast-at", "trades", "distillation", "ensemble"]


def test_defenses_of_a_normalising_model_train_in_its_input_space(tmp_path):
    """mean/std live in the wrapper: defenses train behind the same normalisation and are audited with it."""
    from robustlab.defenses.recipes import Recipe, build_defenses, defended_wrapper
    from robustlab.model import ModelUnderTest

    train, test = digits_split("train"), digits_split("test")
    base = ModelUnderTest(digits_model().eval(), bounds=(0, 1), mean=0.5, std=0.1, name="normalising")
    built = build_defenses(base, ["pgd-at", "distillation", "ensemble"], train,
                           Recipe(eps=0.05, epochs=6, steps=2, members=2), work_dir=tmp_path)
    trained = {"pgd-at": built["pgd-at"], "distillation": built["distillation"],
               "ensemble member": built["ensemble"].members[1]}  # member 0 is the given model itself
    for name, module in trained.items():
        wrapped = defended_wrapper(module, base, name)
        with torch.no_grad():
            accuracy = float((wrapped(test.x).argmax(1) == test.y).double().mean())
            unnormalised = float((module(test.x).argmax(1) == test.y).double().mean())
        assert accuracy > 0.85 and accuracy > unnormalised + 0.05, (name, accuracy, unnormalised)
    assert "inner" not in "".join(built["pgd-at"].state_dict())  # saved weights load into the base factory
