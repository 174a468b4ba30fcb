"""Reports of tabular (1-D) and non-square inputs (issue 20): `--explain saliency,shap` on a 30-feature model
crashed in figures.delta_uri after the attacks ran. Now tabular attributions are bar charts per named feature,
the breast-cancer spec carries sklearn's feature names, --features names any tabular data, and image SHAP
features read as pixels (row, col)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robustlab.cli import main
from robustlab.data import load_data
from robustlab.reports import facts, figures
from robustlab.results import load

pytestmark = pytest.mark.usefixtures("one_thread")

FACTORY = """import torch
from torch import nn


def build():
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))
"""
FAST = ["--attack", "pgd", "--steps", "5", "--suite", "none", "--checks", "none", "--eps", "0.05,0.1", "--n", "30",
        "--quiet"]


@pytest.fixture(scope="module")
def tabular_model(tmp_path_factory) -> Path:
    """A 30-16-2 MLP trained on breast-cancer:train, saved as tab.py:build + tab.safetensors."""
    root = tmp_path_factory.mktemp("tabular")
    (root / "tab.py").write_text(FACTORY)
    data = load_data("breast-cancer:train")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(data.x), data.y).backward()
        optimiser.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "tab.safetensors"))
    return root


def _svg_texts(html: str) -> str:
    """Every SVG figure of a report, decoded (text is kept as text: svg.fonttype none)."""
    return "".join(base64.b64decode(m).decode("utf-8")
                   for m in re.findall(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', html))


def test_breast_cancer_spec_carries_sklearn_names():
    from sklearn.datasets import load_breast_cancer

    test, train = load_data("breast-cancer"), load_data("breast-cancer:train")
    assert test.x.shape == (171, 30) and len(train) == 398
    assert test.features == [str(f) for f in load_breast_cancer().feature_names]
    assert test.classes == ["malignant", "benign"]
    assert float(test.x.min()) >= 0 and float(test.x.max()) <= 1  # the default bounds
    assert test.head(5).features == test.features and test.describe()["features"] == test.features
    assert not set(test.indices.tolist()) & set(train.indices.tolist())


def test_explain_on_a_tabular_model_end_to_end(tabular_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tabular_model)
    out = tmp_path / "audit"
    code = main(["audit", "--model", "tab.py:build", "--weights", "tab.safetensors", "--data", "breast-cancer",
                 "--explain", "saliency,shap", "--out", str(out), *FAST])
    assert code == 0
    html = (out / "report.html").read_text()
    assert "What the attacks changed: explanations" in html
    svg = _svg_texts(html)
    # saliency and SHAP drawn as bars of named features (no x[i]), each bar chart with its legend
    explanations = html[html.index('id="explanations"'):]
    assert explanations.count('class="attribution"') == 2
    assert "worst area" in svg or "mean radius" in svg
    assert "x[" not in explanations
    shap_row = re.search(r"most changed features.*?</tr>.*?<tr>(.*?)</tr>", explanations, re.S).group(1)
    names = set(load_data("breast-cancer").features or [])
    assert any(name in shap_row for name in names), shap_row
    # the examples name the features the attack changed
    examples = html[html.index('id="examples"'):html.index('id="explanations"')]
    assert "x[" not in examples and any(name in examples for name in names)
    assert json.loads((out / "results.json").read_text())["metadata"]["data"]["features"][0] == "mean radius"
    assert not list(out.glob(".*tmp*"))


def test_features_option_names_npz_columns(tabular_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tabular_model)
    data = load_data("breast-cancer")
    np.savez(tmp_path / "tab.npz", x=data.x.numpy(), y=data.y.numpy())
    names = [f"f{i}_{'abcdefghij'[i % 10]}" for i in range(30)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "named"
    code = main(["audit", "--model", "tab.py:build", "--weights", "tab.safetensors", "--data", str(tmp_path / "tab.npz"),
                 "--features", str(tmp_path / "names.txt"), "--explain", "shap", "--out", str(out), *FAST])
    assert code == 0
    result = load(out)
    assert result.metadata["data"]["features"] == names
    html = (out / "report.html").read_text()
    assert any(name in html for name in names) and "x[" not in html[html.index('id="examples"'):]


def _code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # usage errors exit through argparse
        return int(stop.code)


@pytest.mark.parametrize("given, why", [("a,b,c", "expected 30 names"), ("a,,b", "empty feature name"),
                                        (",".join(["same"] * 30), "'same' twice")])
def test_bad_feature_names_are_refused_before_work(tabular_model, tmp_path, monkeypatch, capsys, given, why):
    monkeypatch.chdir(tabular_model)
    out = tmp_path / "never"
    code = _code(["audit", "--model", "tab.py:build", "--weights", "tab.safetensors", "--data", "breast-cancer",
                  "--features", given, "--out", str(out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "features" in err[0] and why in err[0], err
    assert not out.exists()


def test_feature_names_on_images_are_refused():
    from robustlab.errors import InputError

    with pytest.raises(InputError, match="1-D"):
        load_data("digits").with_features(["a"] * 64)


def test_image_shap_features_are_pixels():
    """SHAP features of an image are flat indices into its (possibly pooled) grid: shown as pixel (row, col)."""
    class Result:
        metadata = {"models": {"m": {"input_shape": [1, 8, 8]}}, "data": {}}

    assert facts.feature_label(Result, "m", 10, (8, 8)) == "pixel (1, 2)"
    assert facts.feature_label(Result, "m", "63", (8, 8)) == "pixel (7, 7)"
    Result.metadata = {"models": {"m": {"input_shape": [3, 224, 224]}}, "data": {}}
    # 224x224 pooled by 15 into a 15x15 grid: cell (1, 14) covers rows 15-29, columns 210-223
    assert facts.feature_label(Result, "m", 1 * 15 + 14, (15, 15)) == "pixels (15–29, 210–223)"
    Result.metadata = {"models": {"m": {"input_shape": [30]}}, "data": {"features": [f"n{i}" for i in range(30)]}}
    assert facts.feature_label(Result, "m", 3) == "n3" and facts.feature_label(Result, "m", "n4") == "n4"


@pytest.mark.parametrize("shape", [(30,), (6, 10), (1, 5, 12), (3, 4, 9)])
def test_figures_take_any_input_shape(shape):
    """Every image figure accepts non-square and 1-D inputs (a strip) instead of crashing in PNG encoding."""
    rng = np.random.default_rng(0)
    x = rng.random(shape)
    for uri in (figures.image_uri(x, 0, 1), figures.delta_uri(x - 0.5, 0.5)):
        assert uri.startswith("data:image/png;base64,") and len(uri) > 100
    maps = [rng.normal(size=shape[-2:] if len(shape) > 1 else (1, shape[0])) for _ in range(3)]
    svg = base64.b64decode(figures.attribution_maps([{"label": "#0", "image": x if len(shape) > 1 else None,
                                                      "maps": maps}], ["clean", "pgd", "cw"]).split(",", 1)[1])
    assert b'id="colorbar' in svg
