"""Image folders as data (issue 12): --data DIR/ with one subfolder per class, PNG/JPEG via Pillow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustlab.cli import main
from robustlab.data import digits_split, load_data
from robustlab.errors import InputError
from robustlab.image_folder import parse_image_size

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse-level usage errors
        return int(stop.code)


def _gray(value: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    return np.full(size, value, dtype=np.uint8)


@pytest.fixture
def digits_folder(tmp_path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The first 60 digits test images as 8-bit grayscale PNGs, one folder per class (names zero-padded)."""
    data = digits_split("test").head(60)
    root = tmp_path / "digits"
    counts: dict[int, int] = {}
    for x, y in zip(data.x, data.y.tolist()):
        k = counts.get(y, 0)
        counts[y] = k + 1
        _save(root / f"{y}" / f"{k:03d}.png", np.round(x[0].numpy() * 255).astype(np.uint8))
    return root, data.x, data.y


def test_classes_from_sorted_folder_names_and_round_robin_order(tmp_path):
    for name, value in (("b-dog", 20), ("a-cat", 10), ("c-eel", 30)):
        for i in range(3 if name != "c-eel" else 1):
            _save(tmp_path / name / f"{i}.png", _gray(value + i))
    (tmp_path / "a-cat" / "notes.txt").write_text("not an image")  # ignored
    (tmp_path / ".hidden").mkdir()  # ignored
    data = load_data(str(tmp_path))
    assert data.classes == ["a-cat", "b-dog", "c-eel"]
    assert data.y.tolist() == [0, 1, 2, 0, 1, 0, 1]  # image i of every class before image i + 1
    assert data.x.shape == (7, 1, 8, 8) and data.x.dtype == torch.float32
    assert torch.allclose(data.x[:, 0, 0, 0] * 255, torch.tensor([10., 20, 30, 11, 21, 12, 22]))
    assert data.source == f"images:{tmp_path.name}"


def test_n_opens_only_the_first_n_files(tmp_path, monkeypatch):
    for c in "abc":
        for i in range(4):
            _save(tmp_path / c / f"{i}.png", _gray(i))
    opened: list[str] = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: (opened.append(Path(path).name + Path(path).parent.name),
                                                               real(path, *a, **k))[1])
    data = load_data(str(tmp_path), n=5)
    assert len(data) == 5 and data.y.tolist() == [0, 1, 2, 0, 1]  # spread over the classes
    assert opened == ["0.pnga", "0.pngb", "0.pngc", "1.pnga", "1.pngb"]


def test_rgb_when_any_image_is_colour_grayscale_repeated(tmp_path):
    _save(tmp_path / "gray" / "g.png", _gray(100))
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    _save(tmp_path / "red" / "r.jpg", rgb)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 2] = 255
    _save(tmp_path / "rgba" / "a.png", rgba)
    data = load_data(str(tmp_path))
    assert data.x.shape == (3, 3, 8, 8)
    assert torch.allclose(data.x[0], torch.full((3, 8, 8), 100 / 255))  # gray repeated over the channels
    assert float(data.x[1, 0].mean()) > 0.9 and float(data.x[1, 1:].max()) < 0.1  # JPEG: red, approximately
    assert torch.equal(data.x[2, 2], torch.ones(8, 8)) and float(data.x[2, :2].max()) == 0  # alpha dropped


def test_sixteen_bit_grayscale_is_scaled_to_unit_range(tmp_path):
    _save(tmp_path / "a" / "x.png", np.full((4, 4), 65535, dtype=np.uint16))
    _save(tmp_path / "b" / "y.png", np.full((4, 4), 32768, dtype=np.uint16))
    data = load_data(str(tmp_path))
    assert data.x.shape == (2, 1, 4, 4)
    assert torch.allclose(data.x[:, 0, 0, 0], torch.tensor([1.0, 32768 / 65535]))


def test_image_size_resizes_and_mixed_sizes_need_it(tmp_path):
    _save(tmp_path / "a" / "big.png", _gray(50, (16, 12)))
    _save(tmp_path / "b" / "small.png", _gray(50, (8, 8)))
    with pytest.raises(InputError, match=r"images differ in size: .*big\.png is 12x16 .*small\.png is 8x8.*--image-size"):
        load_data(str(tmp_path))
    data = load_data(str(tmp_path), image_size=(6, 10))
    assert data.x.shape == (2, 1, 6, 10) and torch.allclose(data.x, torch.full_like(data.x, 50 / 255))
    assert load_data(str(tmp_path), image_size="5").x.shape == (2, 1, 5, 5)


@pytest.mark.parametrize("value, expected", [(8, (8, 8)), ("8,6", (8, 6)), ((3, 4), (3, 4)), (None, None)])
def test_parse_image_size(value, expected):
    assert parse_image_size(value) == expected


@pytest.mark.parametrize("value", ["0", "8,x", "1,2,3", -1, 2.5, True, ""])
def test_bad_image_size(value):
    with pytest.raises(InputError, match="^image_size: expected H or H,W"):
        parse_image_size(value)


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match=r"^data: .* is empty; expected an image folder"):
        load_data(str(tmp_path))


def test_folder_without_class_subfolders(tmp_path):
    _save(tmp_path / "x.png", _gray(1))
    with pytest.raises(InputError, match=r"holds images \(x\.png, \.\.\.\) but no class subfolders"):
        load_data(str(tmp_path))


def test_class_folder_without_images(tmp_path):
    _save(tmp_path / "a" / "x.png", _gray(1))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("hi")
    with pytest.raises(InputError, match=r"class folder .*b holds no PNG or JPEG images"):
        load_data(str(tmp_path))


def test_unreadable_image_names_the_file(tmp_path):
    _save(tmp_path / "a" / "fine.png", _gray(1))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match=r"^data: cannot read image .*b/broken\.png"):
        load_data(str(tmp_path))


def test_image_size_without_an_image_folder():
    with pytest.raises(InputError, match="^image_size: resizes the images of an image folder"):
        load_data("digits", image_size=8)


def test_cli_audit_of_an_image_folder_matches_the_arrays(digits_folder, digits_module, tmp_path):
    """The PNGs hold the digits' pixels (to 1/255): the folder's audit sees the same images and labels."""
    root, x, y = digits_folder
    data = load_data(str(root))
    assert data.classes == [str(i) for i in range(10)]
    order = torch.argsort(data.x.reshape(len(data), -1).sum(1))
    assert torch.allclose(data.x.reshape(len(data), -1).sum(1)[order],
                          x.reshape(len(x), -1).sum(1).sort().values, atol=64 / 255)
    weights = tmp_path / "cnn.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in digits_module.state_dict().items()}, str(weights))
    out = tmp_path / "out"
    code = main(["audit", "--model", "robustlab.zoo:digits_cnn", "--weights", str(weights), "--data", str(root),
                 "--n", "20", "--attack", "fgsm", "--eps", "0.1", "--suite", "none", "--checks", "none",
                 "--out", str(out), "--quiet"])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["metadata"]["data"]["n"] == 20 and result["metadata"]["data"]["source"] == "images:digits"
    assert result["metadata"]["models"]["cnn"]["classes"] == [str(i) for i in range(10)]
    clean = next(r["clean_accuracy"] for r in result["summary"] if r["attack"] == "fgsm")
    assert clean >= 0.9  # the trained CNN recognises the digits read back from PNG


@pytest.mark.parametrize("extra, words", [
    (["--image-size", "0"], "--image-size: expected H or H,W"),
    (["--image-size", "8", "--data", "digits"], "--image-size: resizes the images of an image folder"),
])
def test_cli_bad_image_size_exits_2(extra, words, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["audit", "--model", "robustlab.zoo:digits_cnn", "--random-init", "--out", str(out), *extra]
    if "--data" not in extra:
        _save(tmp_path / "imgs" / "a" / "x.png", _gray(3))
        args += ["--data", str(tmp_path / "imgs")]
    code = _run(args)
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1 and not out.exists()


def test_cli_empty_image_folder_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["audit", "--model", "robustlab.zoo:digits_cnn", "--random-init", "--data", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith("robustlab audit: error: data: ") and "is empty" in err
    assert not (tmp_path / "out").exists()
