"""Hook-based steps (BPDA's blocker search and straight-through layers, probes) on TorchScript and
torch.export models, which refuse forward hooks: they run on a hookable twin (robustlab.layers),
or fall back with the reason recorded; never a crash after the attacks (issues 14 and 20)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import integrity_zoo as zoo
import robustlab
from robustlab.attacks.adaptive import bpda, layer_names, locate_gradient_blockers
from robustlab.cli import main
from robustlab.layers import BatchSizeAdapter, hookable
from robustlab.loading import load_model
from support import digits_model, digits_test

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]


class Doubling(nn.Module):
    """A forward with an op of its own: a scripted module robustlab cannot split into layers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = zoo.quantised()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 1.0) * 2.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    x = digits_test().x[:2]
    paths = {}
    for name, build in (("quantised", zoo.quantised), ("plain", zoo.plain)):
        paths[f"{name}.ts"] = folder / f"{name}-ts.pt"
        torch.jit.trace(build(), x).save(str(paths[f"{name}.ts"]))
    paths["quantised.pt2"] = folder / "quantised.pt2"
    torch.export.save(torch.export.export(zoo.quantised(), (x,), dynamic_shapes=({0: torch.export.Dim("b")},)),
                      str(paths["quantised.pt2"]))
    paths["static.pt2"] = folder / "static.pt2"  # batch dimension fixed at 2 by export
    torch.export.save(torch.export.export(zoo.quantised(), (x,)), str(paths["static.pt2"]))
    paths["opaque.ts"] = folder / "opaque-ts.pt"
    torch.jit.trace(Doubling().eval(), x).save(str(paths["opaque.ts"]))
    return paths


def _loaded(path, n: int = 20):
    mut = load_model(str(path))
    mut.inspect(digits_test().x[:n])
    return mut


@pytest.mark.parametrize("kind", ["quantised.ts", "quantised.pt2", "static.pt2"])
def test_blocking_layer_found_in_torchscript_and_exported_models(files, kind):
    """The twin has the original's layer names (here '0' is the Quantise layer, '1.features.0' a conv)."""
    mut = _loaded(files[kind])
    d = digits_test()
    layers, note = locate_gradient_blockers(mut, d.x[:20], d.y[:20])
    assert layers == ["0"] and note is None
    assert {"0", "1.features.0", "1.classifier.3"} <= set(layer_names(mut))
    surrogate = bpda(mut, layers, probe=d.x[:16])
    x = d.x[:8].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(surrogate(x).logsumexp(1).sum(), x)
    assert bool((grad != 0).any())  # BPDA restored the gradient the quantiser kills
    with torch.no_grad():  # same forward function as the original
        torch.testing.assert_close(surrogate(d.x[:8]), mut(d.x[:8]))


def test_torchscript_gradient_masking_model_with_checks_gets_bpda(files):
    """Before: the checks' BPDA called register_forward_pre_hook on a ScriptModule and the audit died."""
    result = robustlab.audit(load_model(str(files["quantised.ts"])), digits_test().head(24), attacks=["pgd"],
                             eps=[0.1], suite="none", checks="default", progress=False)
    s = result.summary.set_index("attack")["robust_accuracy"]
    assert s["pgd-bpda"] < s["pgd"] - 0.3 and s["worst-case"] <= s["pgd-bpda"]
    reasons = {a["attack"]: a.get("reason", "") for a in result.metadata["checks"]["adaptive"]}
    assert reasons["pgd-bpda"].startswith("gradients blocked by 0: BPDA")


def test_opaque_torchscript_falls_back_with_the_reason_recorded(files):
    """A scripted forward that does more than chain its children is one layer: no BPDA, Square instead,
    and the reason says why."""
    mut = _loaded(files["opaque.ts"])
    d = digits_test()
    layers, note = locate_gradient_blockers(mut, d.x[:20], d.y[:20])
    assert layers == [] and "TorchScript" in note and "<root>" in note
    result = robustlab.audit(load_model(str(files["opaque.ts"])), d.head(20), attacks=["pgd"], eps=[0.1],
                             suite="none", checks="default", progress=False)
    notes = [a for a in result.metadata["checks"]["adaptive"] if a["attack"] == "pgd-bpda"]
    assert notes and "no single layer blocks them (TorchScript modules whose forward" in notes[0]["reason"]
    assert "square" in set(result.summary.attack)


def test_cli_explain_probes_and_saliency_on_torchscript(files, tmp_path, capsys):
    """Before: --explain probes was a traceback (hooks on ScriptModules), after all attacks ran."""
    out = tmp_path / "r"
    code = main(["audit", "--model", str(files["plain.ts"]), "--out", str(out), "--n", "24", "--attack", "pgd",
                 "--steps", "5", "--eps", "0.1", "--suite", "none", "--checks", "none", "--explain",
                 "probes,saliency", "--quiet"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    info = doc["metadata"]["explain"]["plain-ts"]
    assert info["skipped"] == {} and {"probes", "saliency"} <= set(info["seconds"])
    layers = (out / "explain_probe_layers.csv").read_text()
    assert "features.0" in layers and "classifier.3" in layers  # the DigitsCNN layers, inside TorchScript


def test_probes_on_an_opaque_torchscript_model_see_its_output_and_say_so(files):
    from robustlab.explain import probe_report

    mut = _loaded(files["opaque.ts"])
    d = digits_test()
    report = probe_report(mut, d.x[:40], d.y[:40], {}, seed=0)
    assert list(report.layers.layer) == [""] and "TorchScript" in report.note


def test_static_batch_program_is_called_in_its_own_batch_size(files):
    """Before: 'Guard failed: x.size()[0] == 2' on the first batch of another size."""
    with pytest.warns(UserWarning, match="batch size is fixed at 2"):
        mut = load_model(str(files["static.pt2"]))
    assert isinstance(mut.module, BatchSizeAdapter) and (mut.module.low, mut.module.high) == (2, 2)
    x = digits_test().x[:7]
    info = mut.inspect(digits_test().x[:20])
    assert any("fixed at 2" in note for note in info.notes)
    reference = zoo.quantised()
    with torch.no_grad():
        torch.testing.assert_close(mut(x), reference(x))  # 7 = 2+2+2+1(padded)
        torch.testing.assert_close(mut(x[:1]), reference(x[:1]))
    z = x.clone().requires_grad_(True)
    w = x.clone().requires_grad_(True)
    (a,) = torch.autograd.grad(mut(z)[:, 3].sum(), z)
    (b,) = torch.autograd.grad(digits_model()(w)[:, 3].sum(), w)
    assert a.shape == b.shape  # gradients reach every real sample (zero here: the quantiser)
    result = robustlab.audit(mut, digits_test().head(9), attacks=["fgsm", "pgd"], steps=3, eps=[0.1], suite="none",
                             checks="none", batch_size=4, progress=False)
    assert set(result.summary.attack) == {"fgsm", "pgd", "worst-case"}


def test_an_exported_program_given_directly_is_unwrapped():
    program = torch.export.export(digits_model(), (digits_test().x[:2],),
                                  dynamic_shapes=({0: torch.export.Dim("b")},))
    mut = robustlab.ModelUnderTest(program)
    x = digits_test().x[:5]
    with torch.no_grad():
        torch.testing.assert_close(mut(x), digits_model()(x))
    assert hookable(mut.module).kind == "exported"
