"""A BatchNorm ResNet audited through the Python API, the CLI and the pytest plugin (issue 19).

Before: every model with BatchNorm crashed at the end of an audit, after all attacks and with
nothing saved: the model hash (`state_dict_sha256`) viewed the 0-dim `num_batches_tracked`
buffer as bytes ("self.dim() cannot be 0 to view Long as Byte").

The model is a tiny ResNet for 1x8x8 digits (a stem and two residual blocks, BatchNorm after
every convolution), trained 8 epochs on digits (about 1.5 s on one thread, ~85% test accuracy).
The audits use 24-40 samples, FGSM/PGD at few steps and the quick suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import robustlab
from robustlab.cli import main
from robustlab.data import digits_split
from robustlab.model import file_sha256, state_dict_sha256, tensor_bytes
from robustlab.training import seeded_init, train_classifier
from bn_resnet import tiny_resnet

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_FILE = Path(__file__).with_name("bn_resnet.py")  # the model: a stem and two residual blocks

PLUGIN_CONFTEST = """
import sys
import pytest
import torch
from safetensors.torch import load_file
from robustlab.data import load_data

sys.path.insert(0, {folder!r})
from bn_resnet import tiny_resnet


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model():
    net = tiny_resnet()
    net.load_state_dict(load_file({weights!r}))
    return net.eval()


@pytest.fixture(scope="session")
def data():
    return load_data({data!r}).head(24)
"""

PLUGIN_TEST = """
import pytest

@pytest.mark.robustness(attack="fgsm", eps=0.05, min_accuracy=0.0, min_clean_accuracy=0.5, name="resnet")
def test_resnet_gate(robustlab, model, data):
    result = robustlab.check(model, data, suite="quick", checks="none")
    assert result.metadata["models"]["resnet"]["sha256"]
"""


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> dict:
    """The trained model, its weights (safetensors) and a small .npz of test digits."""
    import numpy as np
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("resnet")
    source = MODEL_FILE
    net = train_classifier(seeded_init(tiny_resnet, 0), digits_split("train"), epochs=8, lr=1e-2, seed=0)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "w.safetensors"))
    test = digits_split("test").head(40)
    np.savez(folder / "digits.npz", x=test.x.numpy(), y=test.y.numpy())
    return {"folder": str(MODEL_FILE.parent), "source": str(source), "net": net,
            "weights": str(folder / "w.safetensors"), "data": str(folder / "digits.npz"), "test": test}


def _bn_state(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


# ---------------------------------------------------------------------------- the hash
def test_state_dict_hash_covers_every_tensor_kind():
    """0-dim, non-contiguous, bool, bfloat16, complex: hashed by value, never a crash."""
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("count", torch.tensor(7))  # 0-dim int64, like num_batches_tracked
            self.register_buffer("flag", torch.tensor(True))
            self.register_buffer("mask", torch.tensor([True, False, True]))
            self.register_buffer("brain", torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))
            self.register_buffer("wave", torch.tensor([1 + 2j, 3 - 4j]))
            self.register_buffer("empty", torch.zeros(0, 3))
            self.weight = nn.Parameter(torch.arange(6.0).reshape(2, 3).t())  # non-contiguous

    odd = Odd()
    assert not odd.weight.is_contiguous()
    digest = state_dict_sha256(odd)
    assert len(digest) == 64 and digest == state_dict_sha256(odd)
    # non-contiguous: the values in row-major order, as a contiguous copy holds them
    assert tensor_bytes(odd.weight) == tensor_bytes(odd.weight.contiguous())
    assert tensor_bytes(torch.tensor(7)) == (7).to_bytes(8, sys.byteorder)
    assert tensor_bytes(torch.tensor([1 + 2j]).conj()) == tensor_bytes(torch.tensor([1 - 2j]))
    # every value counts
    for name, change in [("count", torch.tensor(8)), ("flag", torch.tensor(False)),
                         ("brain", torch.ones(2, 3, dtype=torch.bfloat16))]:
        other = Odd()
        getattr(other, name).copy_(change)
        assert state_dict_sha256(other) != digest, name
    # a BatchNorm layer: its 0-dim num_batches_tracked is part of the hash
    bn = nn.BatchNorm2d(4)
    before = state_dict_sha256(bn)
    bn.num_batches_tracked += 1
    assert state_dict_sha256(bn) != before


def test_state_dict_hash_is_the_same_in_a_fresh_process(resnet):
    here = state_dict_sha256(resnet["net"])
    code = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        from robustlab.imports import load_object
        from robustlab.model import state_dict_sha256
        net = load_object({resnet['source']!r} + ":tiny_resnet", argument="model")()
        net.load_state_dict(load_file({resnet['weights']!r}))
        print(state_dict_sha256(net))
    """)
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == here


# ---------------------------------------------------------------------------- API
def test_api_audit_of_a_batchnorm_resnet(resnet, tmp_path):
    net, test = resnet["net"], resnet["test"]
    before = _bn_state(net)
    result = robustlab.audit(net, test, attacks=["fgsm", "pgd"], eps=[0.05], steps=5, suite="quick",
                             checks="none", name="resnet", progress=False)
    meta = result.metadata["models"]["resnet"]
    assert meta["sha256"] == state_dict_sha256(net)
    assert result.summary.loc[result.summary.attack == "pgd", "clean_accuracy"].item() > 0.6
    assert {"fgsm", "pgd", "cascade-quick", "worst-case"} <= set(result.summary.attack)
    # the audit ran the model in eval mode: BatchNorm's running statistics are untouched
    after = _bn_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before) and not net.training
    result.save(tmp_path / "out")
    assert robustlab.load(tmp_path / "out").metadata["models"]["resnet"]["sha256"] == meta["sha256"]


# ---------------------------------------------------------------------------- CLI
@pytest.mark.filterwarnings("ignore:model 'tiny_resnet'.*chance level")  # random weights
@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "random-weights"])
def test_cli_audit_of_a_batchnorm_resnet(resnet, tmp_path, capsys, with_weights):
    out = tmp_path / "r"
    weights = ["--weights", resnet["weights"]] if with_weights else ["--random-init"]  # refused without it
    code = main(["audit", "--model", f"{resnet['source']}:tiny_resnet", *weights, "--data", resnet["data"],
                 "--out", str(out), "--attack", "fgsm", "--eps", "0.05", "--n", "24", "--suite", "quick",
                 "--checks", "none", "--quiet"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    [(name, meta)] = doc["metadata"]["models"].items()
    if with_weights:  # loaded from disk: the weights file's hash
        assert name == "w" and meta["sha256"] == file_sha256(resnet["weights"])
    else:  # a factory's random weights: the state dict's hash (num_batches_tracked included)
        assert name == "tiny_resnet" and len(meta["sha256"]) == 64 and int(meta["sha256"], 16)
    assert {r["attack"] for r in doc["summary"]} >= {"fgsm", "cascade-quick", "worst-case"}


# ---------------------------------------------------------------------------- pytest plugin
def test_pytest_plugin_gates_a_batchnorm_resnet(resnet, pytester: pytest.Pytester):
    pytester.makeconftest(PLUGIN_CONFTEST.format(folder=resnet["folder"], weights=resnet["weights"],
                                                 data=resnet["data"]))
    pytester.makepyfile(test_resnet=PLUGIN_TEST)
    run = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--robustlab-report", "rep")
    run.assert_outcomes(passed=1)
    run.stdout.fnmatch_lines(["*test_resnet.py::test_resnet_gate * resnet * worst-case * linf 0.05 * PASS*",
                              "1 gates, 0 failed"])
    saved = Path(pytester.path) / "rep" / "test_resnet.py__test_resnet_gate" / "results.json"
    assert json.loads(saved.read_text())["metadata"]["models"]["resnet"]["sha256"]
