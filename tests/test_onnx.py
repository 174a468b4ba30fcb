"""ONNX models (issue 12): white-box through onnx2torch, black-box through onnxruntime, bad files refused.

The demo CNN (robustlab.zoo.DigitsCNN, trained as in tests/support.py) is exported with
torch.onnx.export (the TorchScript exporter, dynamo=False: the dynamo one needs onnxscript) and
audited through the CLI beside the same weights loaded as a torch model: same samples, same seed,
so the figures agree to float rounding. A graph with an operator onnx2torch lacks (Shrink, with
lambd=bias=0 the identity, so the function is the CNN's) takes the black-box path.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
if importlib.util.find_spec("onnx2torch") is None:  # not importorskip: without torchvision its import fails
    pytest.skip("onnx2torch is not installed (pip install --no-deps onnx2torch)", allow_module_level=True)

import onnx  # noqa: E402
from onnx import helper  # noqa: E402

import robustlab  # noqa: E402
from robustlab.attacks import Square  # noqa: E402
from robustlab.cli import main  # noqa: E402
from robustlab.errors import InputError  # noqa: E402
from robustlab.harness import BLACK_BOX_REASON  # noqa: E402
from robustlab.model import RobustlabWarning  # noqa: E402
from robustlab.onnx_model import OnnxRuntimeModel, load_onnx  # noqa: E402
from robustlab.verdicts import WEAKER  # noqa: E402
from support import digits_model  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]


def _export(module: torch.nn.Module, path: Path, *, batch: int | None = None) -> Path:
    """torch.onnx.export of a 1x8x8 classifier; a symbolic batch unless `batch` fixes it."""
    example = torch.rand(batch or 4, 1, 8, 8)
    axes = None if batch else {"x": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes=axes)
    return path


def _with_shrink(source: Path, path: Path) -> Path:
    """The graph with Shrink(lambd=0, bias=0), the identity, on its input: an operator onnx2torch lacks."""
    model = onnx.load(str(source))
    name = model.graph.input[0].name
    for node in model.graph.node:
        for i, value in enumerate(node.input):
            if value == name:
                node.input[i] = "shrunk"
    model.graph.node.insert(0, helper.make_node("Shrink", [name], ["shrunk"], lambd=0.0, bias=0.0))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def cnn():
    return digits_model().eval()


@pytest.fixture(scope="module")
def files(cnn, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    exported = _export(cnn, root / "cnn.onnx")
    weights = root / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(weights))
    return {"onnx": exported, "weights": weights, "shrink": _with_shrink(exported, root / "shrink.onnx"),
            "root": root}


def _audit(args: list[str], out: Path) -> dict:
    code = main(["audit", *args, "--out", str(out), "--quiet"])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def _robust(result: dict) -> dict[tuple[str, float], float]:
    return {(row["attack"], row["eps"]): row["robust_accuracy"] for row in result["summary"]
            if row["eps"] is not None and row["robust_accuracy"] is not None}


def test_exported_cnn_audits_white_box_like_the_torch_model(files, tmp_path):
    """Same samples, same seed: every attack's robust accuracy and every check agree with the torch model's."""
    common = ["--data", "digits", "--n", "60", "--eps", "0.05,0.1", "--attack", "fgsm,pgd", "--suite", "none",
              "--checks", "default", "--seed", "3"]
    onnx_result = _audit(["--model", str(files["onnx"]), "--name", "net", *common], tmp_path / "onnx")
    torch_result = _audit(["--model", "robustlab.zoo:digits_cnn", "--weights", str(files["weights"]), "--name", "net",
                           *common], tmp_path / "torch")
    source = onnx_result["metadata"]["models"]["net"]["source"]
    assert "converted with onnx2torch" in source and "white-box" in source
    got, expected = _robust(onnx_result), _robust(torch_result)
    assert set(got) == set(expected) and {"fgsm", "pgd", "pgd-margin", "worst-case"} <= {a for a, _ in got}
    for key, value in expected.items():  # within noise: one sample of 60 at most (float rounding at a boundary)
        assert abs(got[key] - value) <= 1 / 60 + 1e-9, (key, got[key], value)
    checks = {c["check"]: c["status"] for c in onnx_result["metadata"]["checks"]["results"]}
    assert checks["gradients"] == "pass" and checks["unbounded"] == "pass"  # white-box checks ran on the graph
    assert checks == {c["check"]: c["status"] for c in torch_result["metadata"]["checks"]["results"]}


def test_converted_model_matches_the_torch_model(files, cnn):
    mut = robustlab.load_model(str(files["onnx"]))
    x = torch.rand(9, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(mut(x), cnn(x), atol=1e-5)
    assert not isinstance(mut.module, OnnxRuntimeModel) and mut.load_notes == []


def test_fixed_batch_graph_runs_on_any_batch(cnn, tmp_path):
    path = _export(cnn, tmp_path / "fixed.onnx", batch=4)
    mut = robustlab.load_model(str(path))
    assert "batch size is fixed at 4" in mut.source
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(mut(x), cnn(x), atol=1e-5)
    runtime = load_onnx(str(_with_shrink(path, tmp_path / "fixed-shrink.onnx")))[0]
    assert isinstance(runtime, OnnxRuntimeModel)
    assert torch.allclose(runtime(x), cnn(x), atol=1e-5)  # chunks of 4, the last one padded


def test_unconvertible_graph_is_audited_black_box(files, cnn):
    with pytest.warns(RobustlabWarning, match=r"black-box through onnxruntime .*Shrink"):
        mut = robustlab.load_model(str(files["shrink"]))
    assert isinstance(mut.module, OnnxRuntimeModel) and "black-box through onnxruntime" in mut.source
    square = Square(queries=150)
    options = dict(data="digits", n=40, eps=(0.1, 0.2), seed=1, suite="standard", checks="default")
    result = robustlab.audit(mut, attacks=["fgsm", "pgd", square], **options)
    attacks = set(result.summary["attack"])
    assert attacks == {"square", "worst-case"}  # no white-box attack, no cascade (it needs gradients)
    for record in result.metadata["evaluation"]:
        assert record["status"] == WEAKER and BLACK_BOX_REASON in record["reasons"]
    assert BLACK_BOX_REASON in result.metadata["black_box"]["shrink"]
    checks = {c["check"]: c["status"] for c in result.metadata["checks"]["results"]}
    assert checks["logits"] == "pass" and checks["determinism"] == "pass" and checks["eps-monotonic"] == "pass"
    assert checks["gradients"] == checks["unbounded"] == checks["black-box"] == "skipped"
    # the graph computes the CNN's function: Square at the same seed finds the same figures on the torch model
    reference = robustlab.audit(cnn, attacks=[square], **dict(options, suite="none", checks="none"), name="shrink")
    ours = result.summary.set_index(["attack", "eps"])["robust_accuracy"]
    theirs = reference.summary.set_index(["attack", "eps"])["robust_accuracy"]
    for eps in (0.1, 0.2):
        assert abs(ours[("square", eps)] - theirs[("square", eps)]) <= 1 / 40 + 1e-9


def test_black_box_with_surrogate_runs_transfer(files, cnn):
    with pytest.warns(RobustlabWarning):
        mut = robustlab.load_model(str(files["shrink"]))
    result = robustlab.audit(mut, "digits", attacks=["pgd", Square(queries=50)], eps=0.1, n=30, suite="none",
                             checks="none", surrogate=cnn)
    rows = result.summary.set_index("attack")
    assert {"pgd", "square"} <= set(rows.index)
    assert "generated on shrink:surrogate" in rows.loc["pgd", "note"]
    assert rows.loc["pgd", "robust_accuracy"] < rows.loc["pgd", "clean_accuracy"]  # the CNN's own PGD transfers


def test_black_box_cli_says_the_evaluation_is_weaker(files, tmp_path, capsys):
    out = tmp_path / "bb"
    code = main(["audit", "--model", str(files["shrink"]), "--data", "digits", "--n", "12", "--eps", "0.1",
                 "--attack", "square", "--checks", "none", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    assert "black-box" in captured.out and "weaker than standard" in captured.out
    assert "not run: cascade" in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("content, words", [
    (b"", "not a valid ONNX model"),  # parses as an empty message; onnx.checker refuses it
    (b"\x08\x07garbage\xff\xfe not protobuf", "cannot read"),
])
def test_corrupt_onnx_file_exits_2_naming_model(content, words, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    out = tmp_path / "out"
    code = main(["audit", "--model", str(bad), "--out", str(out), "--n", "8", "--suite", "none", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("robustlab audit: error: model: ") and words in err
    assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()


def test_truncated_onnx_file_is_refused(files, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(files["onnx"].read_bytes()[:300])
    with pytest.raises(InputError, match=r"^model: cannot read .*cut\.onnx as an ONNX model"):
        robustlab.load_model(str(cut))


def test_conversion_that_disagrees_with_onnxruntime_is_not_trusted(files, monkeypatch):
    import robustlab.onnx_model as onnx_model

    real = onnx_model._convert

    def doubled(onnx2torch, model):
        graph, why = real(onnx2torch, model)
        return torch.nn.Sequential(graph, _Scale(2.0)), why

    monkeypatch.setattr(onnx_model, "_convert", doubled)
    with pytest.warns(RobustlabWarning, match="differs from onnxruntime"):
        mut = robustlab.load_model(str(files["onnx"]))
    assert isinstance(mut.module, OnnxRuntimeModel)


class _Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_missing_package_names_the_extra(files, monkeypatch):
    import robustlab.onnx_model as onnx_model

    found = importlib.util.find_spec
    monkeypatch.setattr(onnx_model.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else found(name, *a))
    with pytest.raises(InputError, match=r"onnxruntime not installed.*robustlab\[onnx\]"):
        robustlab.load_model(str(files["onnx"]))


def test_torchvision_stand_in_does_not_leak():
    import robustlab.onnx_model as onnx_model

    onnx_model.require_onnx()
    if importlib.util.find_spec("torchvision") is None:
        assert "torchvision" not in sys.modules and "torchvision.ops" not in sys.modules


def test_graph_with_two_inputs_is_refused(tmp_path):
    a = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["n", 4])
    b = helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, ["n", 4])
    out = helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["out"])], "two", [a, b], [out])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(InputError, match="takes 2 inputs"):
        robustlab.load_model(str(path))


def test_defenses_of_a_black_box_model_are_refused_before_training(files, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        code = main(["audit", "--model", str(files["shrink"]), "--defend", "pgd-at", "--n", "8", "--eps", "0.1",
                     "--attack", "square", "--suite", "none", "--checks", "none", "--out", str(out), "--quiet"])
    except SystemExit as stop:
        code = int(stop.code)
    err = capsys.readouterr().err
    assert code == 2 and "--defend: " in err and "black-box" in err and "Traceback" not in err
    assert not out.exists()
