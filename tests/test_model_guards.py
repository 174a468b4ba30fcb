"""Guards of the model wrapper against silently wrong numbers (issue 19, item 2).

(a) A declared output kind the outputs contradict is refused: before, `output="probs"` on the
    digits CNN's logits reported FGSM eps 0.1 robust accuracy 0.695 against the true 0.545 (200
    test samples), because log(clamp(logits)) kills the gradient of every negative logit.
(b) NaN or infinite outputs are refused wherever they appear: on clean inputs outside the
    64-sample probe (before: counted as class 0, clean accuracy 0.955 instead of an error, 6 of
    200 inputs) and on perturbed inputs (before: FGSM robust accuracy 0.120, every NaN row
    predicted class 0, so class-0 samples counted robust).
(c) Outputs that depend on the other samples of the batch are refused (before: a batch-centring
    model gave clean accuracy 0.840 / 0.860 / 0.855 at batch sizes 7 / 40 / 200); a difference
    above float rounding but small is warned about.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import robustlab
from robustlab.attacks import FGSM, PGD  # type: ignore[import-not-found]  # mypy cannot follow attacks/ -> robustlab.attacks
from robustlab.cli import main
from robustlab.errors import InputError
from robustlab.model import (BATCH_LIMIT, ModelUnderTest, NonFiniteOutputError, RobustlabWarning, _OutputGuard,
                             _rounding_for)
from bn_resnet import tiny_resnet
from support import LogSoftmaxed, Noisy, Softmaxed, digits_model, digits_test

pytestmark = pytest.mark.usefixtures("one_thread")


class NaNWhenBright(nn.Module):
    """NaN logits for inputs brighter than `threshold` (total pixel sum): clean inputs past the probe."""

    def __init__(self, inner: nn.Module, threshold: float) -> None:
        super().__init__()
        self.inner = inner
        self.threshold = threshold

    def forward(self, x):
        out = self.inner(x)
        bright = x.flatten(1).sum(1, keepdim=True) > self.threshold
        return torch.where(bright, torch.full_like(out, float("nan")), out)


class NaNOffGrid(nn.Module):
    """NaN logits for inputs off the digits' 1/16 grid: every clean input is fine, every perturbed one is not."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        off = (x * 16 - (x * 16).round()).abs().flatten(1).amax(1, keepdim=True) > 1e-4
        return torch.where(off, torch.full_like(out, float("inf")), out)


class BatchCentred(nn.Module):
    """Normalises over the batch: each input is centred on the batch mean (a batch-dependent model)."""

    def __init__(self, inner: nn.Module, share: float = 1.0) -> None:
        super().__init__()
        self.inner = inner
        self.share = share

    def forward(self, x):
        return self.inner(x - self.share * (x.mean(0, keepdim=True) - x.mean()))


class NeedsBatch(nn.Module):
    """Fails on a batch of one, as BatchNorm1d does in training mode."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if len(x) < 2:
            raise ValueError("Expected more than 1 value per channel when training, got input size [1, 10]")
        return self.inner(x)


def _bright_threshold(x: torch.Tensor) -> float:
    """Above the brightest of the first 64 inputs (the probe), below a few later ones."""
    sums = x.flatten(1).sum(1)
    threshold = float(sums[:64].max())
    assert int((sums > threshold).sum()) >= 3
    return threshold


# ============================================================================ (a) declared output kind
def test_declared_probs_on_logits_is_refused_naming_the_argument():
    mut = ModelUnderTest(digits_model(), output="probs")
    with pytest.raises(InputError) as caught:
        mut.inspect(digits_test().x)
    error = caught.value
    assert error.argument == "output" and "\n" not in str(error)
    assert "declared output='probs' (CLI: --output probs)" in str(error)
    assert "they look like logits" in str(error) and "inflates robustness" in str(error)
    with pytest.raises(InputError, match="^output: declared output='probs'"):
        robustlab.audit(digits_model(), digits_test(40), attacks=["fgsm"], eps=0.1, output="probs", suite="none",
                        progress=False)


def test_declared_kinds_that_fit_are_accepted():
    inner = digits_model()
    x = digits_test().x
    assert ModelUnderTest(Softmaxed(inner).eval(), output="probs").inspect(x).output_kind == "probs"
    assert ModelUnderTest(LogSoftmaxed(inner).eval(), output="log_probs").inspect(x).output_kind == "log_probs"
    # "logits" fits every finite output: it is how a user overrides the probability detector
    assert ModelUnderTest(Softmaxed(inner).eval(), output="logits").inspect(x).output_kind == "logits"
    assert ModelUnderTest(LogSoftmaxed(inner).eval(), output="logits").inspect(x).output_kind == "logits"
    # a genuine softmax in bfloat16 rounds its row sums by up to ~1e-2: still accepted
    low = Softmaxed(copy.deepcopy(inner).to(torch.bfloat16)).eval()
    assert ModelUnderTest(low, output="probs").inspect(x.to(torch.bfloat16)).output_kind == "probs"


@pytest.mark.parametrize("module, declared, looks", [
    (lambda m: m, "log_probs", "logits"),
    (lambda m: LogSoftmaxed(m), "probs", "log-probabilities"),
    (lambda m: Softmaxed(m), "log_probs", "probabilities"),
])
def test_other_contradicting_declarations_are_refused(module, declared, looks):
    mut = ModelUnderTest(module(digits_model()).eval(), output=declared)
    with pytest.raises(InputError, match=f"^output: declared output='{declared}'.*they look like {looks}"):
        mut.inspect(digits_test().x)


def test_binary_output_declared_as_a_probability_must_lie_in_the_unit_interval():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 1)).eval()
    with torch.no_grad():
        module[1].bias.fill_(3.0)  # outputs around 3: not probabilities
    with pytest.raises(InputError, match="^output: .*single output is not a probability"):
        ModelUnderTest(module, output="probs").inspect(torch.rand(6, 4))
    sigmoid = nn.Sequential(module, nn.Sigmoid()).eval()
    assert ModelUnderTest(sigmoid, output="probs").inspect(torch.rand(6, 4)).output_kind == "binary_prob"


def test_cli_declared_probs_on_logits_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in digits_model().state_dict().items()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "never"
    code = main(["audit", "--model", "robustlab.zoo:digits_cnn", "--weights", str(tmp_path / "w.safetensors"),
                 "--output", "probs", "--out", str(out), "--n", "20", "--attack", "fgsm", "--suite", "none",
                 "--eps", "0.1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith("robustlab audit: error: output: declared output='probs' (CLI: --output probs)")
    assert err.count("\n") == 1 and "Traceback" not in err


# ============================================================================ (b) non-finite outputs
def test_nan_on_clean_inputs_past_the_probe_is_refused_before_work_with_count_and_index():
    data = digits_test(200)
    threshold = _bright_threshold(data.x)
    bad = torch.nonzero(data.x.flatten(1).sum(1) > threshold).reshape(-1)
    module = NaNWhenBright(digits_model(), threshold).eval()
    with pytest.raises(NonFiniteOutputError) as caught:
        ModelUnderTest(module).inspect(data.x)
    message = str(caught.value)
    assert caught.value.argument == "model"
    assert f"for {len(bad)} of the 200 inputs (e.g. input {int(bad[0])}, counting from 0)" in message
    assert "class 0" in message
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(NonFiniteOutputError, match=f"{len(bad)} of the 200 inputs"):
        robustlab.audit(module, data, attacks=["fgsm"], eps=0.1, suite="none", checks="none", progress=False)
    assert len(calls) <= 3, "an attack ran before the refusal"  # probe x2, then the rest of the data


def test_non_finite_outputs_on_perturbed_inputs_stop_the_attack():
    data = digits_test(50)
    mut = ModelUnderTest(NaNOffGrid(digits_model()).eval())
    mut.inspect(data.x)  # every clean input is fine
    with pytest.raises(NonFiniteOutputError) as caught:
        FGSM(eps=0.1)(mut, data.x, data.y)
    message = str(caught.value)
    # FGSM: one gradient pass on the clean inputs (finite), then the verification pass (all inf):
    # the attack funnel stops there and names the samples
    assert "on 50 of 50 adversarial inputs of fgsm (e.g. sample 0)" in message
    assert "class 0" in message
    with pytest.raises(NonFiniteOutputError, match="adversarial inputs of pgd"):  # its random start is off the grid
        PGD(eps=0.1, steps=3)(mut, data.x, data.y)
    with pytest.raises(NonFiniteOutputError, match="returned NaN or infinite outputs"):
        robustlab.audit(NaNOffGrid(digits_model()).eval(), data, attacks=["fgsm"], eps=0.1, suite="none",
                        checks="none", progress=False)


@pytest.mark.filterwarnings("ignore:model 'make'.*chance level")  # an untrained linear model
def test_cli_non_finite_outputs_exit_2_and_write_nothing(tmp_path, capsys):
    source = tmp_path / "nan_model.py"
    source.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import torch\n"
        "from torch import nn\n"
        "from robustlab.zoo import linear_classifier\n\n"
        "class OffGrid(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.inner = linear_classifier(64, 10)\n"
        "    def forward(self, x):\n"
        "        out = self.inner(x)\n"
        "        off = (x * 16 - (x * 16).round()).abs().flatten(1).amax(1, keepdim=True) > 1e-4\n"
        "        return torch.where(off, torch.full_like(out, float('nan')), out)\n\n"
        "def make():\n"
        "    return OffGrid()\n")
    out = tmp_path / "never"
    code = main(["audit", "--model", f"{source}:make", "--out", str(out), "--n", "20", "--attack", "fgsm",
                 "--suite", "none", "--checks", "none", "--eps", "0.1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith("robustlab audit: error: model: 'make' returned NaN or infinite outputs")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_require_finite_names_the_samples_for_a_verification_funnel():
    mut = ModelUnderTest(digits_model())
    logits = torch.randn(3, 5, 10)  # (draws, n, classes)
    mut.require_finite(logits, sample_ids=torch.arange(100, 105))
    logits[1, 3, 7] = float("nan")
    logits[0, 4, 0] = float("-inf")
    with pytest.raises(NonFiniteOutputError, match=r"on 2 of 5 adversarial examples \(e\.g\. sample 103\)"):
        mut.require_finite(logits, sample_ids=torch.arange(100, 105), what="adversarial examples")
    with pytest.raises(NonFiniteOutputError, match=r"on 1 of 5 inputs \(e\.g\. sample 3\)"):
        mut.require_finite(logits[1])


def test_finite_models_are_unchanged_by_the_guard():
    """Same outcome bit for bit with the guard recording or not (it only reads the outputs)."""
    data = digits_test(60)
    mut = ModelUnderTest(digits_model())
    guarded = PGD(eps=0.1, steps=5)(mut, data.x, data.y, seed=1)
    original = _OutputGuard.record
    _OutputGuard.record = lambda self, out: None  # type: ignore[method-assign]
    try:
        plain = PGD(eps=0.1, steps=5)(mut, data.x, data.y, seed=1)
    finally:
        _OutputGuard.record = original  # type: ignore[method-assign]
    assert torch.equal(guarded.x_adv, plain.x_adv) and torch.equal(guarded.success, plain.success)


def test_the_guard_never_syncs_while_recording(monkeypatch):
    """No conversion to a Python value while recording (a host sync on a GPU); one when checked."""
    guard = _OutputGuard()
    conversions = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            conversions.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    logits = torch.randn(7, 10)
    for _ in range(2 * _OutputGuard.FOLD + 3):  # two folds on the way
        guard.record(logits)
    assert conversions == []
    logits[4, 2] = float("nan")
    guard.record(logits)
    guard.record(torch.randn(7, 10))

    class Stub:
        name, bounds = "stub", type("B", (), {"describe": lambda self: "[0, 1]"})()

    with pytest.raises(NonFiniteOutputError, match=r"for 1 of the 3619 inputs of 517 forward passes \(the first: "
                                                   r"input 4 of a batch of 7 in pass 516"):
        guard.check(Stub())  # type: ignore[arg-type]
    assert conversions == ["tolist"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are only observable on a CUDA device")
def test_the_guard_never_syncs_on_the_gpu():
    guard = _OutputGuard()
    logits = torch.randn(64, 10, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2 * _OutputGuard.FOLD + 3):
            guard.record(logits)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ============================================================================ (c) batch composition
def test_outputs_that_depend_on_the_batch_are_refused():
    data = digits_test(200)
    with pytest.raises(InputError, match="^model: outputs depend on the other samples in the batch") as caught:
        ModelUnderTest(BatchCentred(digits_model()).eval()).inspect(data.x)
    assert "predictions change" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(InputError, match="depend on the other samples"):
        robustlab.audit(BatchCentred(digits_model()).eval(), data, attacks=["fgsm"], eps=0.1, suite="none",
                        batch_size=7, progress=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_batch_norm_in_training_mode_baked_into_a_trace_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    net = tiny_resnet().train()
    traced = torch.jit.trace(net, digits_test().x[:16], check_trace=False)
    path = tmp_path / "train-mode.pt"
    traced.save(str(path))
    out = tmp_path / "never"
    code = main(["audit", "--model", str(path), "--out", str(out), "--n", "40", "--attack", "fgsm", "--suite", "none",
                 "--eps", "0.1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith("robustlab audit: error: model: outputs depend on the other samples in the batch")
    assert "batch norm in training mode" in err and err.count("\n") == 1


def test_mild_batch_dependence_is_warned_about_not_refused():
    mut = ModelUnderTest(BatchCentred(digits_model(), share=0.01).eval())
    with pytest.warns(RobustlabWarning, match="more than float rounding explains"):
        info = mut.inspect(digits_test().x)
    assert 1e-4 < info.max_batch_difference < BATCH_LIMIT
    assert any("differ from those in a batch" in note for note in info.notes)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_float_rounding_between_batch_and_single_inputs_is_far_below_the_limits(dtype):
    """The measurements behind the tolerances (robustlab/model.py, BATCH_LIMIT): on the CPU a sample
    alone and in a batch differ by 2e-7 of the largest logit in float32, 1e-16 in float64, 0 in half
    precision; the warning threshold is 1e-4 (1e-2 in half precision), the refusal 5e-2."""
    torch.manual_seed(0)
    resnet = tiny_resnet().eval()
    x = digits_test().x.to(dtype)
    for module in (digits_model(), resnet):
        mut = ModelUnderTest(copy.deepcopy(module).to(dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RobustlabWarning)
            info = mut.inspect(x)
        noise = _rounding_for(dtype, mut.device, False).batch_noise
        assert info.max_batch_difference is not None and info.max_batch_difference <= noise / 100


def test_random_models_skip_the_batch_check_and_single_sample_failures_are_clear():
    with pytest.warns(RobustlabWarning, match="not deterministic"):
        info = ModelUnderTest(Noisy(digits_model()).eval()).inspect(digits_test().x)
    assert info.max_batch_difference is None and any("batch-composition check was skipped" in n for n in info.notes)
    with pytest.raises(InputError, match="^model: fails on a batch of one input"):
        ModelUnderTest(NeedsBatch(digits_model()).eval()).inspect(digits_test().x)


def test_inspection_records_the_batch_difference(tmp_path):
    mut = ModelUnderTest(digits_model())
    mut.inspect(digits_test().x)
    described = mut.describe()
    assert described["max_batch_difference"] is not None and described["max_batch_difference"] < 1e-5
    np.testing.assert_array_equal(np.array(described["input_shape"]), np.array([1, 8, 8]))
