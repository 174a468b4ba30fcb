"""The model wrapper: output kinds, eval mode, normalisation, determinism, bad models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab.errors import InputError
from robustlab.model import ModelUnderTest, RobustlabWarning
from support import LogSoftmaxed, Noisy, Softmaxed, digits_model, digits_test, tiny_linear


def test_logits_model_is_inspected():
    mut = ModelUnderTest(digits_model())
    info = mut.inspect(digits_test().x)
    assert info.num_classes == 10 and info.output_kind == "logits" and info.deterministic
    assert info.input_shape == (1, 8, 8)


def test_probabilities_are_refused_with_a_clear_message():
    mut = ModelUnderTest(Softmaxed(digits_model()).eval())
    with pytest.raises(InputError, match="probabilities") as caught:
        mut.inspect(digits_test().x)
    assert "output='probs'" in str(caught.value)


def test_probabilities_accepted_when_declared_and_converted_to_log_probs():
    inner = digits_model()
    mut = ModelUnderTest(Softmaxed(inner).eval(), output="probs")
    x = digits_test().x[:8]
    assert mut.inspect(x).output_kind == "probs"
    with torch.no_grad():
        torch.testing.assert_close(mut(x).softmax(1), torch.softmax(inner(x), 1), atol=1e-5, rtol=1e-4)


def test_log_probabilities_are_handled_as_logits():
    mut = ModelUnderTest(LogSoftmaxed(digits_model()).eval())
    assert mut.inspect(digits_test().x).output_kind == "log_probs"


def test_single_logit_binary_classifier_gets_two_logits():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 1)).eval()
    mut = ModelUnderTest(module)
    x = torch.rand(5, 4)
    assert mut.inspect(x).num_classes == 2
    with torch.no_grad():
        z = module(x).reshape(-1)
        torch.testing.assert_close(mut(x), torch.stack([torch.zeros_like(z), z], 1))


def test_train_mode_is_refused_before_any_work():
    module = digits_model()
    module.train()
    try:
        with pytest.raises(InputError, match="training mode"):
            ModelUnderTest(module)
    finally:
        module.eval()


def test_evaluating_restores_every_flag():
    module = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2)).eval()
    module[1].train()  # a deliberately mixed state must come back as it was
    module[0].weight.requires_grad_(True)
    module[2].weight.requires_grad_(False)
    mut = ModelUnderTest.__new__(ModelUnderTest)
    mut.module = module
    with ModelUnderTest.evaluating(mut):
        assert not any(m.training for m in module.modules())
        assert not any(p.requires_grad for p in module.parameters())
    assert module[1].training and not module[0].training
    assert module[0].weight.requires_grad and not module[2].weight.requires_grad


def test_normalisation_happens_inside_the_wrapper():
    module = digits_model()
    mut = ModelUnderTest(module, mean=[0.3], std=[0.2])
    x = digits_test().x[:4]
    with torch.no_grad():
        torch.testing.assert_close(mut(x), module((x - 0.3) / 0.2))


def test_per_channel_normalisation_shape_checked():
    mut = ModelUnderTest(digits_model(), mean=[0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="mean"):
        mut.inspect(digits_test().x)


def test_random_forward_pass_is_detected_and_reported():
    mut = ModelUnderTest(Noisy(digits_model()).eval())
    with pytest.warns(RobustlabWarning, match="not deterministic"):
        info = mut.inspect(digits_test().x)
    assert not info.deterministic and info.max_repeat_difference > 0
    assert mut.describe()["deterministic"] is False


def test_nan_outputs_and_bad_shapes_are_input_errors():
    class NaNModel(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 3), float("nan"))

    with pytest.raises(InputError, match="NaN"):
        ModelUnderTest(NaNModel().eval()).inspect(torch.rand(4, 2))
    with pytest.raises(InputError, match="cannot process inputs of shape"):
        ModelUnderTest(tiny_linear(64)).inspect(torch.rand(4, 1, 5, 5))


def test_class_names_must_match_outputs():
    with pytest.raises(InputError, match="class names"):
        ModelUnderTest(digits_model(), classes=["a", "b"]).inspect(digits_test().x)


def test_state_dict_hash_is_stable_and_sensitive():
    a = tiny_linear(seed=0)
    assert ModelUnderTest(a).sha256() == ModelUnderTest(tiny_linear(seed=0)).sha256()
    assert ModelUnderTest(a).sha256() != ModelUnderTest(tiny_linear(seed=1)).sha256()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_mixed_precision_needs_a_gpu():
    with pytest.raises(InputError, match="CUDA"):
        ModelUnderTest(digits_model(), amp=True)
