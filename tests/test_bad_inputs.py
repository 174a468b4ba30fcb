"""The bad-input catalogue (issue 14): every case gets a clear one-line error naming the argument,
exit 2 from the CLI (InputError from the API), before any work, with nothing written; or, where
the input is usable, it is handled correctly (the ACCEPTED cases).

Started with the loading, data and model cases; report, compare, load and plugin cases belong
here too. Each CLI case runs `robustlab audit` with a small, fast configuration and checks: exit
2, stderr one line `robustlab audit: error: ARGUMENT: ...` containing the expected words, no
traceback, and an output directory that still does not exist.
"""

from __future__ import annotations

import copy
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import integrity_zoo as zoo
import robustlab
from crafted import craft_pt2
from robustlab.cli import main
from robustlab.data import load_data
from robustlab.errors import InputError
from robustlab.loading import load_model
from support import Softmaxed, digits_model, digits_test

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]

FAST = ["--n", "8", "--attack", "fgsm", "--eps", "0.1", "--suite", "none", "--checks", "none", "--quiet"]


# ---------------------------------------------------------------------------- helpers to build files
def _x(n: int = 8) -> np.ndarray:
    return digits_test().x[:n].numpy()


def _y(n: int = 8) -> np.ndarray:
    return digits_test().y[:n].numpy()


def _npz(tmp: Path, name: str = "d.npz", **arrays) -> str:
    path = tmp / name
    np.savez(path, **arrays)
    return str(path)


def _traced(tmp: Path, module: nn.Module, name: str = "m.pt", example=None) -> str:
    path = tmp / name
    torch.jit.trace(module, digits_test().x[:4] if example is None else example, check_trace=False).save(str(path))
    return str(path)


def _exported(tmp: Path, module: nn.Module, args: tuple, name: str = "m.pt2", dynamic=None) -> str:
    path = tmp / name
    torch.export.save(torch.export.export(module, args, dynamic_shapes=dynamic), str(path))
    return str(path)


def _py(tmp: Path, body: str, name: str = "netmod.py") -> str:
    path = tmp / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _weights(tmp: Path, state: dict, name: str = "w.safetensors") -> str:
    path = tmp / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def _cnn() -> nn.Module:
    """A private copy of the suite's digits CNN (never change the shared one's mode or weights)."""
    return copy.deepcopy(digits_model()).eval()


class BNDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _cnn()
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.net(x))


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] + y.flatten(1)[:, :10]


class NaNOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) / (x.flatten(1)[:, :1] - x.flatten(1)[:, :1])  # 0/0


# ---------------------------------------------------------------------------- CLI cases
@dataclass(frozen=True)
class CliCase:
    id: str
    build: Callable[[Path], list[str]]  # tmp folder -> the audit arguments (without --out and FAST)
    argument: str  # the argument the message must name first
    words: str  # and a phrase it must contain


def _digits_npz(tmp: Path) -> str:
    return _npz(tmp, x=_x(), y=_y())


CLI_CASES = [
    # --model: files
    CliCase("model-missing", lambda t: ["--model", str(t / "nope.pt")], "model", "file not found"),
    CliCase("model-empty-file", lambda t: ["--model", _empty(t)], "model", "not a zip"),
    CliCase("model-garbage", lambda t: ["--model", _garbage(t, "g.pt")], "model", "not a zip"),
    CliCase("model-directory", lambda t: ["--model", str(t)], "model", "is not a file"),
    CliCase("model-onnx", lambda t: ["--model", _garbage(t, "m.onnx")], "model", "ONNX"),
    CliCase("model-pickled-module", lambda t: ["--model", _pickled_module(t)], "model", "--trust-pickle"),
    CliCase("model-state-dict-as-model", lambda t: ["--model", _state_dict_file(t)], "model", "--weights"),
    CliCase("model-pt2-garbage", lambda t: ["--model", _garbage(t, "m.pt2")], "model", "not a zip"),
    CliCase("model-pt2-truncated", lambda t: ["--model", _truncated_pt2(t)], "model", "torch.export"),
    CliCase("model-pt2-is-torchscript", lambda t: ["--model", _traced(t, digits_model(), "m.pt2")], "model",
            "not a torch.export program"),
    CliCase("model-pt2-payload", lambda t: ["--model", _evil_pt2(t)], "model", "--trust-pickle"),
    CliCase("model-pt2-two-inputs", lambda t: ["--model", _exported(t, TwoInputs(), (torch.zeros(2, 1, 8, 8),
                                                                                      torch.zeros(2, 1, 8, 8)))],
            "model", "takes 2 inputs"),
    CliCase("model-pt2-train-mode-batchnorm", lambda t: ["--model", _exported(t, BNDropout().train(),
                                                                              (torch.rand(4, 1, 8, 8),))],
            "model", "exported with batch norm in training mode"),
    CliCase("model-traced-train-mode-batchnorm", lambda t: ["--model", _traced(t, BNDropout().train())], "model",
            "traced with batch norm in training mode"),
    CliCase("model-torchscript-wrong-input-shape", lambda t: ["--model", _traced(t, nn.Linear(3, 10).eval(),
                                                                                   example=torch.zeros(4, 3))],
            "x", "cannot process inputs of shape"),
    CliCase("model-pt2-fixed-image-size", lambda t: [  # export fixed 8x8 images; the data are 16x16
        "--model", _exported(t, digits_model().eval(), (torch.rand(2, 1, 8, 8),), dynamic=({0: torch.export.Dim("b")},)),
        "--data", _npz(t, x=np.random.default_rng(0).random((8, 1, 16, 16), np.float32), y=_y())],
            "x", "cannot process inputs of shape (1, 16, 16)"),
    CliCase("model-probabilities", lambda t: ["--model", _traced(t, Softmaxed(_cnn()).eval())], "model",
            "returns probabilities"),
    CliCase("model-nan-outputs", lambda t: ["--model", _traced(t, NaNOutputs().eval())], "model",
            "NaN or infinite outputs"),
    # --model: module:factory and --weights
    CliCase("factory-module-missing", lambda t: ["--model", "no_such_module_xyz:build"], "model", "no_such_module"),
    CliCase("factory-attribute-missing", lambda t: ["--model", "robustlab.zoo:no_such_factory"], "model",
            "no_such_factory"),
    CliCase("factory-raises", lambda t: ["--model", _py(t, "def build():\n    raise RuntimeError('boom')\n") +
                                         ":build"], "model", "calling"),
    CliCase("factory-returns-non-module", lambda t: ["--model", _py(t, "def build():\n    return 42\n") + ":build"],
            "model", "not a torch.nn.Module"),
    CliCase("factory-not-callable", lambda t: ["--model", _py(t, "build = 3\n") + ":build"], "model", "not callable"),
    CliCase("factory-random-init-without-weights", lambda t: ["--model", "robustlab.zoo:digits_cnn"], "model",
            "random initialisation"),
    CliCase("weights-with-a-model-file", lambda t: ["--model", _traced(t, digits_model()), "--weights",
                                                    _weights(t, digits_model().state_dict())], "weights",
            "module:factory"),
    CliCase("weights-missing", lambda t: ["--model", "robustlab.zoo:digits_cnn", "--weights", str(t / "no.pt")],
            "weights", "file not found"),
    CliCase("weights-do-not-fit", lambda t: ["--model", "robustlab.zoo:digits_cnn", "--weights",
                                             _weights(t, {"w": torch.zeros(2)})], "weights", "does not fit"),
    CliCase("weights-with-python-objects", lambda t: ["--model", "robustlab.zoo:digits_cnn", "--weights",
                                                      _checkpoint_with_object(t)], "weights", "--trust-pickle"),
    CliCase("weights-corrupt-safetensors", lambda t: ["--model", "robustlab.zoo:digits_cnn", "--weights",
                                                      _garbage(t, "w.safetensors")], "weights", "safetensors"),
    CliCase("weights-garbage-pt", lambda t: ["--model", "robustlab.zoo:digits_cnn", "--weights",
                                             _garbage(t, "w.pt")], "weights", "cannot read"),
    # --data
    CliCase("data-missing-npz", lambda t: ["--data", str(t / "nope.npz")], "data", "file not found"),
    CliCase("data-not-an-npz", lambda t: ["--data", _garbage(t, "d.npz")], "data", "not an .npz"),
    CliCase("data-npz-without-y", lambda t: ["--data", _npz(t, x=_x())], "data", "must contain arrays 'x' and 'y'"),
    CliCase("data-labels-fractional-floats", lambda t: ["--data", _npz(t, x=_x(), y=_y() + 0.5)], "y",
            "not whole numbers"),
    CliCase("data-labels-nan", lambda t: ["--data", _npz(t, x=_x(), y=np.full(8, np.nan))], "y", "not whole numbers"),
    CliCase("data-labels-strings", lambda t: ["--data", _npz(t, x=_x(), y=np.array(["cat"] * 8))], "y",
            "labels are strings"),
    CliCase("data-labels-complex", lambda t: ["--data", _npz(t, x=_x(), y=_y() + 1j)], "y", "complex"),
    CliCase("data-object-arrays", lambda t: ["--data", _object_npz(t)], "data", "object arrays"),
    CliCase("data-length-mismatch", lambda t: ["--data", _npz(t, x=_x(), y=_y(5))], "data", "8 inputs but 5 labels"),
    CliCase("data-empty", lambda t: ["--data", _npz(t, x=_x()[:0], y=_y()[:0])], "data", "no samples"),
    CliCase("data-one-dimensional-x", lambda t: ["--data", _npz(t, x=np.zeros(8, np.float32), y=_y())], "x",
            "expected a batch of inputs"),
    CliCase("data-one-hot-labels", lambda t: ["--data", _npz(t, x=_x(), y=np.eye(10)[_y()])], "y", "one-hot"),
    CliCase("data-strings-as-inputs", lambda t: ["--data", _npz(t, x=np.array([["a"]] * 8), y=_y())], "x",
            "inputs are strings"),
    CliCase("data-spec-unknown", lambda t: ["--data", "no_such_module_xyz:load"], "data", "no_such_module"),
    CliCase("data-function-returns-junk", lambda t: ["--data", _py(t, "def load():\n    return 42\n", "dmod.py")
                                                     + ":load"], "data", "expected (x, y) arrays"),
    CliCase("data-labels-out-of-range", lambda t: ["--data", _npz(t, x=_x(), y=np.full(8, 99))], "y", "99"),
    CliCase("data-labels-negative", lambda t: ["--data", _npz(t, x=_x(), y=np.full(8, -1))], "y", "-1"),
    CliCase("data-directory", lambda t: ["--data", str(_folder(t))], "data",
            "holds no class subfolders; expected one subfolder per class"),
    CliCase("data-directory-named-npz", lambda t: ["--data", str(_folder(t, "d.npz"))], "data",
            "is a directory; expected 'digits', an .npz file"),
    # options that name themselves (issue 19; before: "not a number: 'abc'", "eps: ...", "x: ... index 268")
    CliCase("eps-not-a-number", lambda t: ["--eps", "abc"], "--eps", "not a number: 'abc'"),
    CliCase("eps-divides-by-zero", lambda t: ["--eps", "8/0"], "--eps", "'8/0' divides by zero"),
    CliCase("bounds-not-a-number", lambda t: ["--bounds", "0,x"], "--bounds", "not a number: 'x'"),
    CliCase("fail-under-value-not-a-number", lambda t: ["--fail-under", "robust_accuracy=abc"], "--fail-under",
            "'abc' is not a number"),
    CliCase("fail-under-eps-not-audited", lambda t: ["--fail-under", "robust_accuracy=0.5@0.3"], "--fail-under",
            "eps 0.3 is not audited"),
    CliCase("require-eps-not-audited", lambda t: ["--require", "robust_accuracy>=0.5@8/255"], "--require",
            "is not audited"),
    CliCase("defend-eps-not-a-number", lambda t: [*_factory(t), "--defend", "pgd-at", "--defend-eps", "abc"],
            "--defend-eps", "not a number: 'abc'"),
    CliCase("defend-eps-negative", lambda t: [*_factory(t), "--defend", "pgd-at", "--defend-eps", "-1"],
            "--defend-eps", "must be a finite number >= 0"),
    CliCase("defend-eps-too-large", lambda t: [*_factory(t), "--defend", "pgd-at", "--defend-eps", "8"],
            "--defend-eps", "8 is larger than the input range 1"),
    CliCase("train-data-nan", lambda t: [*_factory(t), "--defend", "pgd-at", "--train-data", _nan_train(t)],
            "train-data", "NaN or infinite values (in 1 samples, e.g. index 13)"),
    CliCase("name-with-a-path", lambda t: ["--name", "../evil"], "name", "contains '..' as a path component"),
    CliCase("name-with-the-key-separator", lambda t: ["--name", "a|b"], "name", "contains '|'"),
    # --out, checked before any work
    CliCase("out-is-a-file", lambda t: ["--out", _garbage(t, "out-file")], "out", "exists and is not a directory"),
    CliCase("out-holds-other-files", lambda t: ["--out", str(_results_with(t, "notes.txt"))], "out",
            "holds files robustlab did not write (notes.txt)"),
    CliCase("out-not-empty-not-results", lambda t: ["--out", str(_folder(t))], "out",
            "is not empty and holds no robustlab results"),
]


def _folder(t: Path, name: str = "folder") -> Path:
    (t / name).mkdir(exist_ok=True)
    (t / name / "keep.txt").write_text("the user's\n")
    return t / name


def _factory(t: Path) -> list[str]:
    return ["--model", "robustlab.zoo:digits_cnn", "--weights", _weights(t, digits_model().state_dict())]


def _nan_train(t: Path) -> str:
    x = digits_test().x[:20].numpy().copy()
    x[13, 0, 4, 4] = np.nan
    return _npz(t, "train.npz", x=x, y=digits_test().y[:20].numpy())


def _results_with(t: Path, extra: str) -> Path:
    out = t / "previous"
    _audit(digits_model(), (_x(), _y())).save(out)
    (out / extra).write_text("the user's\n")
    return out


def _empty(t: Path) -> str:
    (t / "e.pt").write_bytes(b"")
    return str(t / "e.pt")


def _garbage(t: Path, name: str) -> str:
    (t / name).write_bytes(b"definitely not a model \x00\x01")
    return str(t / name)


def _pickled_module(t: Path) -> str:
    torch.save(digits_model(), str(t / "pickled.pt"))
    return str(t / "pickled.pt")


def _state_dict_file(t: Path) -> str:
    torch.save(digits_model().state_dict(), str(t / "sd.pt"))
    return str(t / "sd.pt")


def _checkpoint_with_object(t: Path) -> str:
    torch.save({"state_dict": digits_model().state_dict(), "note": object()}, str(t / "ckpt.pt"))
    return str(t / "ckpt.pt")


def _plain_pt2(t: Path) -> Path:
    path = t / "plain.pt2"
    if not path.exists():
        _exported(t, digits_model(), (digits_test().x[:2],), "plain.pt2",
                  dynamic=({0: torch.export.Dim("batch")},))
    return path


def _truncated_pt2(t: Path) -> str:
    data = _plain_pt2(t).read_bytes()
    (t / "cut.pt2").write_bytes(data[: len(data) // 2])
    return str(t / "cut.pt2")


def _evil_pt2(t: Path) -> str:
    return str(craft_pt2(t / "evil.pt2", t / "ran", _plain_pt2(t), "sample-inputs"))


def _object_npz(t: Path) -> str:
    y = np.empty(8, dtype=object)
    y[:] = [{"label": 1}] * 8
    return _npz(t, x=_x(), y=y)


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(case: CliCase, tmp_path, capsys):
    args = case.build(tmp_path)
    if "--data" not in args:
        args += ["--data", _digits_npz(tmp_path)]
    if "--model" not in args:
        args += ["--model", _traced(tmp_path, digits_model())]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = _tree(tmp_path)
    try:
        code = main(["audit", *FAST, *args])  # the case's options after FAST's, so that they win
    except SystemExit as exit:  # command-line values argparse-style (parser.exit): the same contract
        code = exit.code
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.startswith(f"robustlab audit: error: {case.argument}: "), captured.err
    assert case.words in captured.err, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()
    assert _tree(tmp_path) == before  # nothing else written or changed either


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b"" for p in folder.rglob("*")}


# ---------------------------------------------------------------------------- API cases
@dataclass(frozen=True)
class ApiCase:
    id: str
    call: Callable[[Path], object]
    argument: str
    words: str


def _audit(model, data, **kw):
    return robustlab.audit(model, data, attacks=["fgsm"], eps=[0.1], suite="none", checks="none", progress=False, **kw)


class _Items(torch.utils.data.Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


API_CASES = [
    ApiCase("load-model-not-a-path", lambda t: load_model(123), "model", "expected a file path"),  # type: ignore[arg-type]
    ApiCase("load-model-weights-not-a-path", lambda t: load_model("robustlab.zoo:digits_cnn", weights=3),  # type: ignore[arg-type]
            "weights", "expected a file path"),
    ApiCase("load-model-random-init-not-bool", lambda t: load_model("robustlab.zoo:digits_cnn", random_init="yes"),  # type: ignore[arg-type]
            "random_init", "True or False"),
    ApiCase("load-model-random-init-with-a-file", lambda t: load_model(_traced(t, digits_model()), random_init=True),
            "random_init", "module:factory"),
    ApiCase("load-model-random-init-with-weights",
            lambda t: load_model("robustlab.zoo:digits_cnn", weights=_weights(t, digits_model().state_dict()),
                                 random_init=True), "random_init", "cannot go with weights"),
    ApiCase("load-model-random-init-refused", lambda t: load_model("robustlab.zoo:digits_cnn"), "model",
            "random_init=True"),
    ApiCase("audit-module-in-train-mode", lambda t: _audit(BNDropout().train(), (_x(), _y())), "model",
            "training mode"),
    ApiCase("audit-fractional-float-labels", lambda t: _audit(digits_model(), (_x(), _y() + 0.25)), "y",
            "not whole numbers"),
    ApiCase("audit-string-labels", lambda t: _audit(digits_model(), (_x(), _y().astype(str))), "y",
            "labels are strings"),
    ApiCase("audit-mixed-labels", lambda t: _audit(digits_model(), (_x(), [1, "a"] * 4)), "y", "labels are strings"),
    ApiCase("audit-object-labels", lambda t: _audit(digits_model(), (_x(), [1, None] * 4)), "y", "object array"),
    ApiCase("dataset-string-labels", lambda t: load_data(_Items([(torch.zeros(1, 8, 8), "cat")] * 4)), "y",
            "labels are strings"),
    ApiCase("dataset-fractional-labels", lambda t: load_data(_Items([(torch.zeros(1, 8, 8), 0.5)] * 4)), "y",
            "not whole numbers"),
    ApiCase("dataset-ragged-inputs", lambda t: load_data(_Items([(torch.zeros(1, 8, 8), 1), (torch.zeros(3), 1)])),
            "x", "differ in shape"),
    ApiCase("dataloader-float-labels", lambda t: load_data(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0.5, 1, 2, 3])), batch_size=2)), "y",
            "not whole numbers"),
    ApiCase("dataloader-string-labels", lambda t: load_data(torch.utils.data.DataLoader(
        _Items([(torch.zeros(1, 8, 8), "cat")] * 4), batch_size=2)), "y", "labels are strings"),
    # issue 19: before, eps="0.1" was "got '0'" (iterated) and a name with ../ became entry names
    ApiCase("audit-eps-text-not-a-number", lambda t: robustlab.audit(digits_model(), (_x(), _y()), attacks="fgsm",
                                                                     eps="abc", suite="none", checks="none",
                                                                     progress=False), "eps", "not a number: 'abc'"),
    ApiCase("audit-eps-none", lambda t: robustlab.audit(digits_model(), (_x(), _y()), eps=None, suite="none",
                                                        checks="none", progress=False), "eps",
            "expected a number or a list of numbers"),
    ApiCase("audit-name-with-a-path", lambda t: _audit(digits_model(), (_x(), _y()), name="../../evil"), "name",
            "contains '..' as a path component"),
    ApiCase("audit-dict-key-with-a-path", lambda t: _audit({"a\\..\\b": digits_model()}, (_x(), _y())), "model",
            "contains '..' as a path component"),
    ApiCase("audit-name-with-a-newline", lambda t: _audit(digits_model(), (_x(), _y()), name="a\nb"), "name",
            "contains a control character"),
    ApiCase("audit-name-dot-dot", lambda t: _audit(digits_model(), (_x(), _y()), name="."), "name",
            "contains only dots"),
    ApiCase("save-into-a-folder-of-other-files", lambda t: _audit(digits_model(), (_x(), _y())).save(_folder(t)),
            "out", "is not empty and holds no robustlab results"),
    ApiCase("load-results-json-a-list", lambda t: robustlab.load(_results_json(t, [1, 2])), "results",
            "holds a JSON list"),
    ApiCase("load-results-json-without-summary", lambda t: robustlab.load(_results_json(
        t, {"schema": "robustlab.results/2", "metadata": {}})), "results", "has no summary records"),
    ApiCase("load-results-json-binary", lambda t: robustlab.load(_results_json(t, b"\x80\x04binary")), "results",
            "cannot read"),
    ApiCase("load-missing-directory", lambda t: robustlab.load(t / "nope"), "results", "has no results.json"),
]


def _results_json(t: Path, document) -> Path:
    import json

    (t / "r").mkdir()
    path = t / "r" / "results.json"
    if isinstance(document, bytes):
        path.write_bytes(document)
    else:
        path.write_text(json.dumps(document))
    return t / "r"


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_bad_input(case: ApiCase, tmp_path):
    with pytest.raises(InputError) as raised:
        case.call(tmp_path)
    assert raised.value.argument == case.argument, str(raised.value)
    assert str(raised.value).startswith(f"{case.argument}: ") and case.words in str(raised.value)
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------------- usable inputs, handled
class Squeezing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze()  # shape (10,) for a batch of one


def test_integral_float_and_bool_labels_are_converted():
    data = load_data((_x(), _y().astype(np.float32)))
    assert data.y.dtype == torch.int64 and data.y.tolist() == _y().tolist()
    assert load_data((_x(4), np.array([True, False, True, False]))).y.tolist() == [1, 0, 1, 0]
    result = _audit(digits_model(), (_x(), _y().astype(np.float64)))
    assert result.summary["clean_accuracy"].iloc[0] > 0.8


@pytest.mark.parametrize("n, batch", [(1, None), (9, 4)], ids=["one-sample", "last-batch-of-one"])
def test_a_model_that_squeezes_a_batch_of_one(n, batch):
    """Before: 'returned shape (10, 1)' for one sample, a cat error for a last batch of one."""
    result = robustlab.audit(Squeezing().eval(), (_x(n), _y(n)), attacks=["fgsm", "pgd"], steps=3, eps=[0.1],
                             suite="none", checks="none", batch_size=batch, progress=False)
    reference = robustlab.audit(digits_model(), (_x(n), _y(n)), attacks=["fgsm", "pgd"], steps=3, eps=[0.1],
                                suite="none", checks="none", batch_size=batch, progress=False)
    assert result.summary["robust_accuracy"].tolist() == reference.summary["robust_accuracy"].tolist()


def test_random_init_on_purpose_is_audited_with_a_warning():
    with pytest.warns(UserWarning, match="untrained model"):
        mut = load_model("robustlab.zoo:digits_cnn", random_init=True)
    assert "random initialisation" in mut.source
    mut.inspect(digits_test().x[:16])
    assert any("untrained" in note for note in mut.inspection.notes)


def test_a_factory_that_loads_its_own_weights_needs_no_flag(tmp_path):
    weights = _weights(tmp_path, digits_model().state_dict())
    module = _py(tmp_path, f"""
        from safetensors.torch import load_file
        from robustlab.zoo import DigitsCNN
        def build():
            net = DigitsCNN()
            net.load_state_dict(load_file({weights!r}))
            return net
    """, "trained.py")
    mut = load_model(f"{module}:build")
    x = digits_test().x[:8]
    with torch.no_grad():
        torch.testing.assert_close(mut(x), digits_model()(x))


def test_traced_dropout_in_training_mode_loads_with_a_note(tmp_path):
    path = _traced(tmp_path, nn.Sequential(_cnn(), nn.Dropout(0.3)).train())
    with pytest.warns(UserWarning, match="dropout in training mode"):
        mut = load_model(path)
    assert any("dropout" in note for note in mut.load_notes)
    assert zoo  # the zoo's masking models are exercised in tests/test_hooks_formats.py


def test_single_strings_for_attacks_and_eps_are_one_attack_and_one_budget():
    """Before: attacks="pgd" was "unknown attack 'p'" and eps="0.1" was "got '0'"."""
    data = (_x(), _y())
    as_text = robustlab.audit(digits_model(), data, attacks="fgsm", eps="0.1, 8/255", suite="none", checks="none",
                              progress=False)
    as_lists = robustlab.audit(digits_model(), data, attacks=["fgsm"], eps=[0.1, 8 / 255], suite="none",
                               checks="none", progress=False)
    assert as_text.summary.equals(as_lists.summary.assign(seconds=as_text.summary["seconds"]))


@pytest.mark.parametrize("options, ignored", [(dict(steps=5), "steps=5"), (dict(restarts=3), "restarts=3"),
                                              (dict(steps=5, restarts=2), "restarts=2")])
def test_steps_and_restarts_with_fgsm_alone_are_said_to_be_ignored(options, ignored):
    with pytest.warns(UserWarning, match=f"{ignored} is ignored: none of the attacks run \\(fgsm\\) takes it"):
        _audit(digits_model(), (_x(), _y()), **options)


def test_steps_reaching_an_attack_are_not_called_ignored(recwarn):
    robustlab.audit(digits_model(), (_x(), _y()), attacks=["fgsm", "pgd"], eps=[0.1], steps=2, restarts=1,
                    suite="none", checks="none", progress=False)
    assert not [w for w in recwarn if "is ignored" in str(w.message)]


# ---------------------------------------------------------------------------- report, compare, load (CLI)
@dataclass(frozen=True)
class ReadCase:
    id: str
    build: Callable[[Path], Path]  # tmp folder -> a results directory
    words: str


def _tampered(t: Path) -> Path:
    out = t / "r"
    _audit(digits_model(), (_x(), _y())).save(out)
    text = (out / "samples.csv").read_text()
    assert ",fgsm," in text
    (out / "samples.csv").write_text(text.replace(",fgsm,", ",pgd,", 1))  # edited after the audit
    return out


READ_CASES = [
    ReadCase("results-json-a-list", lambda t: _results_json(t, [1, 2]), "holds a JSON list"),
    ReadCase("results-json-without-summary", lambda t: _results_json(t, {"schema": "robustlab.results/2"}),
             "has no summary records"),
    ReadCase("results-json-not-json", lambda t: _results_json(t, b"not json"), "cannot read"),
    ReadCase("results-json-other-schema", lambda t: _results_json(t, {"schema": "other/1", "summary": []}),
             "has schema 'other/1'"),
    ReadCase("samples-changed-after-the-audit", _tampered, "samples.csv does not match the digest"),
]


@pytest.mark.parametrize("case", READ_CASES, ids=[c.id for c in READ_CASES])
@pytest.mark.parametrize("command", ["report", "compare"])
def test_report_and_compare_refuse_bad_results(case: ReadCase, command: str, tmp_path, capsys):
    directory = case.build(tmp_path)
    before = _tree(tmp_path)
    argv = ["report", str(directory)] if command == "report" else \
        ["compare", str(directory), str(directory), "-o", str(tmp_path / "diff.md")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robustlab {command}: error: ") and case.words in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------------------- --out that cannot be written
def _read_only_runner(directory: Path) -> list[str]:
    """A command prefix under which `directory` is read-only: chmod for an ordinary user; for root (whom
    permissions do not stop) a private read-only bind mount (unshare -m); skipped where neither works."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("running as root without unshare -m: no way to make a directory read-only")
    script = (f'mount --bind "{directory}" "{directory}" && mount -o remount,bind,ro "{directory}" && '
              'exec "$0" "$@"')
    return ["unshare", "-m", "sh", "-c", script]


@pytest.mark.parametrize("where", ["existing-results", "under-it"])
def test_out_on_a_read_only_directory_is_refused_before_any_work(where, tmp_path):
    """Before: the audit ran to the end and failed at save time, losing the whole run."""
    import os
    import subprocess
    import sys

    directory = _results_with(tmp_path, "report.html")  # an earlier result: robustlab's files only
    out = directory if where == "existing-results" else directory / "new"
    before = _tree(directory)
    prefix = _read_only_runner(directory)
    try:
        done = subprocess.run([*prefix, sys.executable, "-m", "robustlab", "audit", *FAST, "--model",
                               _traced(tmp_path, digits_model()), "--data", _digits_npz(tmp_path), "--out", str(out)],
                              capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    finally:
        directory.chmod(0o755)
    assert done.returncode == 2, done.stderr
    expected = "is read-only" if where == "existing-results" else f"cannot write under {directory}"
    assert done.stderr.startswith("robustlab audit: error: out: ") and expected in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert _tree(directory) == before


def test_explain_saliency_on_a_torchscript_model_with_trainable_parameters(tmp_path, capsys):
    """Before: the sanity check's copy of a ScriptModule had non-leaf parameters, and --explain saliency
    died after every attack (RuntimeError: you can only change requires_grad flags of leaf variables).
    A plain torch.jit.trace of a trained model keeps requires_grad=True: the common case."""
    import json

    model = _cnn()
    assert all(p.requires_grad for p in model.parameters())
    out = tmp_path / "out"
    code = main(["audit", *FAST, "--model", _traced(tmp_path, model), "--data", _digits_npz(tmp_path), "--explain",
                 "saliency", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "results.json").read_text())["metadata"]["explain"]["m"]
    assert info["skipped"] == {} and "saliency" in info["seconds"]
    assert "reflects the model" in (out / "explain_sanity.csv").read_text()
