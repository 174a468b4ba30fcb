"""Loading models from disk: TorchScript, torch.export, factory + weights; untrusted pickles refused."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file

from robustlab.errors import InputError, UntrustedFileError
from robustlab.loading import load_model
from robustlab.model import file_sha256
from support import digits_model, digits_test


def _same_logits(mut, module):
    x = digits_test().x[:16]
    with torch.no_grad():
        torch.testing.assert_close(mut(x), module(x))


def test_torchscript_file(tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.trace(digits_model(), digits_test().x[:2]).save(str(path))
    mut = load_model(str(path))
    assert mut.name == "net" and mut.sha256() == file_sha256(str(path))
    _same_logits(mut, digits_model())


def test_torch_export_program(tmp_path):
    path = tmp_path / "net.pt2"
    program = torch.export.export(digits_model(), (digits_test().x[:2],),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    mut = load_model(str(path), name="exported")
    assert mut.name == "exported"
    _same_logits(mut, digits_model())


def test_factory_with_safetensors_and_state_dict(tmp_path):
    state = {k: v.contiguous() for k, v in digits_model().state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, str(tmp_path / "w.pt"))
    for weights in ("w.safetensors", "w.pt"):
        mut = load_model("robustlab.zoo:digits_cnn", weights=str(tmp_path / weights))
        assert mut.name == "w" and mut.sha256() == file_sha256(str(tmp_path / weights))
        _same_logits(mut, digits_model())


def test_factory_from_a_python_file(tmp_path):
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        from robustlab.zoo import DigitsCNN
        def build():
            return DigitsCNN().train()   # robustlab puts a model it builds into eval mode itself
    """))
    mut = load_model(f"{tmp_path / 'net.py'}:build", random_init=True)  # DigitsCNN() is untrained
    assert not mut.module.training


def test_pickled_module_refused_unless_trusted(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save(digits_model(), str(path))
    with pytest.raises(UntrustedFileError, match="arbitrary"):
        load_model(str(path))
    _same_logits(load_model(str(path), trust_pickle=True), digits_model())


def test_weights_with_python_objects_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": digits_model().state_dict(), "note": object()}, str(path))
    with pytest.raises(UntrustedFileError):
        load_model("robustlab.zoo:digits_cnn", weights=str(path))


def test_nested_checkpoint_state_dict_is_found(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": digits_model().state_dict(), "epoch": 3}, str(path))
    _same_logits(load_model("robustlab.zoo:digits_cnn", weights=str(path)), digits_model())


def test_state_dict_given_as_model_explains_what_to_do(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(digits_model().state_dict(), str(path))
    with pytest.raises(InputError, match="--weights"):
        load_model(str(path))


@pytest.mark.parametrize("content, match", [(b"garbage", "not a zip"), (b"", "not a zip")])
def test_unreadable_model_files(tmp_path, content, match):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        load_model(str(path))


def test_missing_onnx_and_mismatched_weights(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model(str(tmp_path / "nope.pt"))
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(InputError, match="ONNX"):
        load_model(str(tmp_path / "m.onnx"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(InputError, match="does not fit"):
        load_model("robustlab.zoo:digits_cnn", weights=str(tmp_path / "bad.safetensors"))
