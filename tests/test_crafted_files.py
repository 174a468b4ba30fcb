"""Crafted files for every loader: a payload in the file never runs unless the user trusts it.

Each payload creates a marker file when unpickled (tests/crafted.py). Without trust the loader
must refuse (UntrustedFileError for a file that needs unpickling, InputError for one that is
not what it claims) and the marker must not exist. Where torch itself would run the payload,
a control case shows the file is a live threat: torch.export.load (or trust_pickle=True) creates
the marker.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import robustlab
from crafted import (PT2_VARIANTS, craft_npz_object_array, craft_pickled_module, craft_pt2, craft_safetensors,
                     craft_state_dict_with_object, craft_torchscript)
from robustlab.data import load_data
from robustlab.errors import InputError, UntrustedFileError
from robustlab.loading import load_model, pt2_unsafe_parts
from support import digits_model, digits_test

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore:Duplicate name"),
              pytest.mark.usefixtures("one_thread")]

LIVE_IN_TORCH = {"sample-inputs", "pickled-weight", "opaque-constant"}  # torch.export.load runs these payloads


@pytest.fixture(scope="module")
def plain_pt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "plain.pt2"
    program = torch.export.export(digits_model(), (digits_test().x[:2],),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


def test_a_plain_exported_program_has_no_unsafe_part_and_loads_without_trust(plain_pt2):
    """torch 2.13's .pt2 entries: raw tensor weights and constants (JSON configs), the graph as
    JSON, sample inputs as a torch.save pickle that loads with weights_only=True."""
    import zipfile

    names = {n.split("/", 1)[1] for n in zipfile.ZipFile(plain_pt2).namelist()}
    assert {"models/model.json", "data/sample_inputs/model.pt", "data/weights/model_weights_config.json",
            "data/constants/model_constants_config.json", "archive_format"} <= names
    assert pt2_unsafe_parts(plain_pt2.read_bytes()) == []
    mut = load_model(str(plain_pt2))
    x = digits_test().x[:8]
    with torch.no_grad():
        torch.testing.assert_close(mut(x), digits_model()(x))


@pytest.mark.parametrize("variant", PT2_VARIANTS)
def test_pt2_payloads_never_run_without_trust(tmp_path, plain_pt2, variant):
    marker = tmp_path / "ran"
    path = craft_pt2(tmp_path / f"{variant}.pt2", marker, plain_pt2, variant)
    with pytest.raises(UntrustedFileError) as refused:
        load_model(str(path))
    message = str(refused.value)
    assert message.startswith("model: ") and "--trust-pickle" in message and "\n" not in message
    assert not marker.exists()
    # the CLI: exit 2, one line, nothing written, the payload not run
    from robustlab.cli import main

    out = tmp_path / "out"
    assert main(["audit", "--model", str(path), "--out", str(out), "--n", "4", "--quiet"]) == 2
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("variant", sorted(LIVE_IN_TORCH))
def test_pt2_payloads_are_live_threats(tmp_path, plain_pt2, variant):
    """Control: the crafted files are real attacks on torch.export.load itself (and trust_pickle=True,
    which hands the file to torch.export.load, runs them too)."""
    marker = tmp_path / "ran"
    path = craft_pt2(tmp_path / f"{variant}.pt2", marker, plain_pt2, variant)
    try:
        torch.export.load(str(path))
    except Exception:  # noqa: BLE001 - the payload runs before the load fails
        pass
    assert marker.exists()
    marker.unlink()
    try:
        load_model(str(path), trust_pickle=True)
    except InputError:
        pass
    assert marker.exists()


def test_pt2_graph_calling_a_python_function_never_runs(tmp_path, plain_pt2):
    """No pickle at all: a graph node calling os.system. torch's verifier refuses the operator at load."""
    from crafted import craft_pt2_graph_call

    marker = tmp_path / "ran"
    path = craft_pt2_graph_call(tmp_path / "graph.pt2", marker, plain_pt2)
    assert pt2_unsafe_parts(path.read_bytes()) == []  # nothing pickled: it is the graph that is hostile
    for trust in (False, True):
        with pytest.raises(InputError, match="not an allowed operator type"):
            load_model(str(path), trust_pickle=trust)
    assert not marker.exists()


def test_pt2_refusal_names_what_was_found(tmp_path, plain_pt2):
    marker = tmp_path / "ran"
    parts = pt2_unsafe_parts(craft_pt2(tmp_path / "s.pt2", marker, plain_pt2, "sample-inputs").read_bytes())
    assert parts == ["data/sample_inputs/model.pt needs unpickling beyond tensors (Unsupported global: GLOBAL "
                     "io.open); torch.export.load retries it with weights_only=False"]
    parts = pt2_unsafe_parts(craft_pt2(tmp_path / "w.pt2", marker, plain_pt2, "pickled-weight").read_bytes())
    assert parts == ["weight 'features.0.weight' is pickled (data/weights/weight_evil: a tensor subclass), loaded "
                     "with torch.load(weights_only=False)"]
    assert not marker.exists()


def test_torch_save_module_refused(tmp_path):
    marker = tmp_path / "ran"
    path = craft_pickled_module(tmp_path / "model.pt", marker)
    with pytest.raises(UntrustedFileError, match="arbitrary code"):
        load_model(str(path))
    assert not marker.exists()


def test_state_dict_with_objects_refused(tmp_path):
    marker = tmp_path / "ran"
    path = craft_state_dict_with_object(tmp_path / "ckpt.pt", marker, digits_model().state_dict())
    with pytest.raises(UntrustedFileError) as refused:
        load_model("robustlab.zoo:digits_cnn", weights=str(path))
    assert refused.value.argument == "weights"
    assert not marker.exists()


def test_torchscript_with_a_payload_refused(tmp_path):
    marker = tmp_path / "ran"
    scripted = torch.jit.trace(digits_model(), digits_test().x[:2])
    path = craft_torchscript(tmp_path / "net.pt", marker, scripted)
    for trust in (False, True):  # TorchScript's unpickler only builds TorchScript types: never the payload
        with pytest.raises(InputError, match="TorchScript archive that torch.jit.load cannot load: Unknown type name"):
            load_model(str(path), trust_pickle=trust)
        assert not marker.exists()


def test_safetensors_that_is_a_pickle_refused(tmp_path):
    marker = tmp_path / "ran"
    path = craft_safetensors(tmp_path / "w.safetensors", marker)
    with pytest.raises(InputError) as refused:
        load_model("robustlab.zoo:digits_cnn", weights=str(path))
    assert refused.value.argument == "weights" and "safetensors" in str(refused.value)
    assert not marker.exists()


def test_npz_with_object_arrays_refused(tmp_path):
    marker = tmp_path / "ran"
    path = craft_npz_object_array(tmp_path / "data.npz", marker, digits_test().x[:4].numpy())
    with pytest.raises(InputError) as refused:
        load_data(str(path))
    assert refused.value.argument == "data" and "trust" in str(refused.value)
    assert not marker.exists()


def test_results_directory_with_object_arrays_never_unpickled(tmp_path):
    """robustlab.load reads examples.npz with allow_pickle=False (robustlab/results.py): whatever it
    raises, the payload does not run."""
    marker = tmp_path / "ran"
    out = tmp_path / "results"
    result = robustlab.audit(digits_model(), digits_test().head(8), attacks=["fgsm"], eps=[0.1], suite="none",
                             checks="none", progress=False)
    result.save(out)
    craft_npz_object_array(out / "examples.npz", marker, np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(InputError, match="examples.npz does not match the digest"):  # a file not of this run
        robustlab.load(out)
    assert not marker.exists()
    document = json.loads((out / "results.json").read_text())
    del document["files"]  # results saved before digests: the archive is read, without unpickling
    (out / "results.json").write_text(json.dumps(document))
    with pytest.warns(UserWarning, match="without file digests"), \
            pytest.raises(InputError, match="cannot read .*examples.npz: Object arrays cannot be loaded"):
        robustlab.load(out)
    assert not marker.exists()


def test_pickled_baseline_never_unpickled(tmp_path):
    """Baselines are JSON (robustlab/gates.py): a pickle in their place is never unpickled."""
    import pickle

    from crafted import Payload
    from robustlab.gates import baseline_summary

    marker = tmp_path / "ran"
    path = tmp_path / "baseline.json"
    path.write_bytes(pickle.dumps({"summary": Payload(marker)}))
    with pytest.raises(Exception):  # noqa: B017
        baseline_summary(str(path))
    assert not marker.exists()
    assert json.dumps({"checked": True})  # keep json imported for the reader of this file
