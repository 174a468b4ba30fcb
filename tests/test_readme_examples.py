"""The README's examples, run verbatim (issue 20: its "by hand" pytest example failed as written).

Every fenced code block of README.md is one test. The HTML comment on the line before a block says how:

    <!-- readme-test: skip: REASON -->         not run, with the reason (network installs, GPUs, torchrun);
                                                the whole rest of the comment is the reason
    <!-- readme-test: slow -->                  marked slow (CI runs it; `-m "not slow"` leaves it out)
    <!-- readme-test: pytest -->                a pytest module: run by `pytest --robustlab-quick` (the pull-request
                                                mode) with the fixtures my_model and my_test_data (an easy
                                                2-class problem the model is robust on)
    <!-- readme-test: requirements file -->     a robustlab.toml, read as `robustlab audit` reads it
    <!-- readme-test: files: A, B (what) -->    files the example names, made here before it runs

bash blocks run with `bash -e` and python blocks with the venv's python, in a fresh directory holding the
named files; a block without a marker must run as it is. Each must exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[a-z]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<spec>.*?)\s*-->\s*$")
LANGUAGES = ("bash", "python", "toml")


@dataclass
class Block:
    line: int
    lang: str
    code: str
    skip: str | None = None
    slow: bool = False
    pytest_module: bool = False
    requirements: bool = False
    files: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"README.md:{self.line}:{self.lang}"


def _blocks() -> list[Block]:
    text = README.read_text()
    out = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        block = Block(line, match["lang"], textwrap.dedent(match["body"]))
        marker = MARKER.search(before)
        if marker and marker["spec"].startswith("skip:"):  # the rest is the reason, semicolons and all
            block.skip = marker["spec"][len("skip:"):].strip()
        elif marker:
            for part in (p.strip() for p in marker["spec"].split(";")):
                if part == "slow":
                    block.slow = True
                elif part == "pytest":
                    block.pytest_module = True
                elif part == "requirements file":
                    block.requirements = True
                elif part.startswith("files:"):
                    names = re.sub(r"\([^)]*\)", "", part[len("files:"):])
                    block.files = tuple(n.strip() for n in names.split(",") if n.strip())
                else:
                    raise AssertionError(f"README.md:{line}: unknown readme-test marker part {part!r}")
        out.append(block)
    return out


BLOCKS = _blocks()


def test_every_block_is_understood():
    assert len(BLOCKS) >= 10
    for block in BLOCKS:
        assert block.lang in LANGUAGES, f"{block.id}: a code block needs a language ({', '.join(LANGUAGES)})"
        assert block.skip is None or len(block.skip) > 10, f"{block.id}: a skipped block says why"
        unknown = [f for f in block.files if f not in MAKERS]
        assert not unknown, f"{block.id}: no maker for {unknown}; add one to MAKERS"


# ---------------------------------------------------------------------------- what the examples use
class Brightness(nn.Module):
    """Dark (class 0) vs bright (class 1) images: logits from the mean pixel; a margin of 0.3 per pixel, so
    robust at every budget the examples use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([-8 * m, 8 * m], 1)


def brightness_data(n: int = 64, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = np.clip(np.where(y[:, None, None, None] == 1, 0.8, 0.2) + rng.uniform(-0.05, 0.05, (n, channels, 8, 8)), 0, 1)
    return x.astype(np.float32), y.astype(np.int64)


CONFTEST = '''
import numpy as np
import pytest
import torch
from torch import nn


class Brightness(nn.Module):
    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([-8 * m, 8 * m], 1)


@pytest.fixture
def my_model():
    return Brightness().eval()


@pytest.fixture
def my_test_data():
    data = np.load("test-data.npz")
    return data["x"], data["y"]
'''


def _digits_weights(path: Path) -> None:
    from safetensors.torch import save_file

    from support import digits_model

    save_file({k: v.contiguous() for k, v in digits_model().state_dict().items()}, str(path))


def _net_pt(where: Path) -> None:
    class ThreeChannel(nn.Module):  # the README normalises with ImageNet's mean/std: 3 channels
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([-8 * m, 8 * m], 1)

    torch.jit.script(ThreeChannel().eval()).save(str(where / "net.pt"))


def _test_npz(where: Path) -> None:
    x, y = brightness_data(40, channels=3)
    np.savez(where / "test.npz", x=x, y=y)


def _mypkg(where: Path) -> None:
    (where / "mypkg").mkdir(exist_ok=True)
    (where / "mypkg" / "__init__.py").write_text("")
    (where / "mypkg" / "nets.py").write_text("from robustlab.zoo import DigitsCNN\n\n\ndef make_cnn():\n"
                                             "    return DigitsCNN()\n")


def _net_py(where: Path) -> None:
    (where / "net.py").write_text("from robustlab.zoo import DigitsCNN\n\n\ndef build():\n    return DigitsCNN()\n")


def _train_npz(where: Path) -> None:
    from robustlab.data import digits_split

    train = digits_split("train").head(300)
    np.savez(where / "train.npz", x=train.x.numpy(), y=train.y.numpy())


def _saved_audit(name: str, seed: int = 0):
    def make(where: Path) -> None:
        import robustlab

        x, y = brightness_data(40, seed=seed)
        robustlab.audit(Brightness().eval(), (x, y), attacks=["fgsm", "pgd"], eps=[0.05, 0.1], suite="none",
                        checks="none", progress=False).save(where / name.rstrip("/"))
    return make


def _baseline_audit(where: Path) -> None:
    import robustlab

    x, y = brightness_data()
    robustlab.audit(Brightness().eval(), (x, y), attacks=["fgsm", "pgd"], eps=[0.05, 0.1], suite="quick", checks="none",
                    progress=False).save(where / "baseline-audit")  # as the example's audit under --robustlab-quick


MAKERS = {
    "net.pt": _net_pt, "test.npz": _test_npz, "mypkg/nets.py": _mypkg, "cnn.safetensors":
        lambda w: _digits_weights(w / "cnn.safetensors"), "train.npz": _train_npz, "net.py": _net_py,
    "net.safetensors": lambda w: _digits_weights(w / "net.safetensors"), "baseline-audit/": _baseline_audit,
    "audit/": _saved_audit("audit/"), "base/": _saved_audit("base/"), "candidate/": _saved_audit("candidate/", 1),
}


# ---------------------------------------------------------------------------- running them
def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("ROBUSTLAB_CACHE", str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _run(block: Block, where: Path) -> subprocess.CompletedProcess:
    env = _env(where)
    if block.requirements:
        (where / "robustlab.toml").write_text(block.code)
        command = [sys.executable, "-c", "from robustlab import gates; f = gates.find_requirements_file('.'); "
                   "print(f.name, [str(r) for r in gates.requirements_file(f)])"]
    elif block.pytest_module:
        (where / "conftest.py").write_text(CONFTEST)
        x, y = brightness_data()
        np.savez(where / "test-data.npz", x=x, y=y)
        (where / "test_example.py").write_text(block.code)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--robustlab-quick", "test_example.py"]
    elif block.lang == "python":
        (where / "example.py").write_text(block.code)
        command = [sys.executable, "example.py"]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    return subprocess.run(command, cwd=where, env=env, capture_output=True, text=True, timeout=3600)


def _params():
    for block in BLOCKS:
        marks = []
        if block.skip:
            marks.append(pytest.mark.skip(reason=f"{block.id}: {block.skip}"))
        if block.slow:
            marks.append(pytest.mark.slow)
        yield pytest.param(block, id=block.id, marks=marks)


@pytest.mark.parametrize("block", list(_params()))
def test_readme_example_runs(block: Block, tmp_path):
    if block.lang not in LANGUAGES:
        pytest.fail(f"{block.id}: unknown language {block.lang!r}")
    for name in block.files:
        MAKERS[name](tmp_path)
    run = _run(block, tmp_path)
    assert run.returncode == 0, f"{block.id} exited {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    if block.requirements:
        assert run.stdout.startswith("robustlab.toml") and "robust_accuracy" in run.stdout, run.stdout
    if block.pytest_module:
        assert re.search(r"\b1 passed\b", run.stdout), run.stdout[-2000:]
