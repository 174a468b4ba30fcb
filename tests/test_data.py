"""Data specs and validation: digits, .npz, module:function, bad data."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from robustlab.data import digits_split, load_data
from robustlab.errors import InputError


def test_digits_split_is_fixed_disjoint_and_in_unit_box():
    train, test = digits_split("train"), digits_split("test")
    assert test.x.shape == (450, 1, 8, 8) and len(train) + len(test) == 1797
    assert not set(train.indices.tolist()) & set(test.indices.tolist())
    assert float(test.x.min()) >= 0 and float(test.x.max()) <= 1
    assert torch.equal(load_data("digits").x, test.x)
    assert load_data("digits").fingerprint() == digits_split("test").fingerprint()


def test_npz_round_trip(tmp_path):
    x = np.random.default_rng(0).random((6, 3, 4, 4)).astype(np.float32)
    y = np.arange(6) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(str(tmp_path / "d.npz"))
    assert data.x.shape == (6, 3, 4, 4) and data.y.tolist() == y.tolist()


def test_npz_without_x_and_y_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 3)), labels=np.zeros(2))
    with pytest.raises(InputError, match="'x' and 'y'"):
        load_data(str(tmp_path / "d.npz"))


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([object(), 1], dtype=object), y=np.zeros(2))
    with pytest.raises(InputError, match="unpickling"):
        load_data(str(tmp_path / "d.npz"))


def test_unreadable_npz(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read"):
        load_data(str(tmp_path / "bad.npz"))
    with pytest.raises(InputError, match="not found"):
        load_data(str(tmp_path / "missing.npz"))


@pytest.mark.parametrize("kind", ["arrays", "dataset", "loader"])
def test_function_spec_returning_arrays_dataset_or_loader(tmp_path, kind):
    (tmp_path / "mydata.py").write_text(textwrap.dedent(f"""
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        def make():
            x = torch.rand(10, 2, 3)
            y = torch.arange(10) % 4
            if "{kind}" == "arrays":
                return x.numpy(), y.numpy()
            ds = TensorDataset(x, y)
            return ds if "{kind}" == "dataset" else DataLoader(ds, batch_size=3)
    """))
    data = load_data(f"{tmp_path / 'mydata.py'}:make")
    assert data.x.shape == (10, 2, 3) and data.y.tolist() == (torch.arange(10) % 4).tolist()


@pytest.mark.parametrize("x, y, match", [
    (np.zeros((3, 4)), np.zeros(2), "3 inputs but 2 labels"),
    (np.zeros((3, 4)), np.eye(3), "one-hot"),
    (np.zeros(3), np.zeros(3), "batch of inputs"),
])
def test_malformed_arrays(x, y, match):
    with pytest.raises(InputError, match=match):
        load_data((x, y))


def test_unknown_spec_and_missing_function():
    with pytest.raises(InputError, match="neither"):
        load_data("no-such-thing")
    with pytest.raises(InputError, match="cannot import"):
        load_data("no_such_module_xyz:make")


# ---------------------------------------------------------------------------- n applied while reading (issue 12)
class CountingDataset(torch.utils.data.Dataset):
    """A Dataset that counts the items fetched from it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        self.fetched.append(i)
        return torch.full((1, 4, 4), i / self.size), i % 3


def test_n_reads_only_n_items_of_a_dataset():
    source = CountingDataset(100)
    data = load_data(source, n=7)
    assert len(data) == 7 and source.fetched == list(range(7))
    assert data.y.tolist() == [i % 3 for i in range(7)]
    everything = CountingDataset(100)
    assert len(load_data(everything)) == 100 and len(everything.fetched) == 100


def test_n_stops_a_dataloader_after_the_batch_that_reaches_it():
    source = CountingDataset(100)
    loader = torch.utils.data.DataLoader(source, batch_size=4)
    data = load_data(loader, n=10)
    assert len(data) == 10 and source.fetched == list(range(12))  # three batches of 4, cut to 10
    assert torch.equal(data.x[:, 0, 0, 0], torch.arange(10) / 100)


def test_audit_applies_n_before_reading(tmp_path):
    import robustlab
    from support import tiny_linear

    source = CountingDataset(500)
    result = robustlab.audit(tiny_linear(16, 3), source, attacks=["fgsm"], eps=0.1, n=9, suite="none",
                             checks="none")
    assert source.fetched == list(range(9)) and int(result.summary["n"].iloc[0]) == 9


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_n_reads_the_first_rows_of_an_npz(save, tmp_path, monkeypatch):
    x = np.random.default_rng(1).random((40, 2, 3)).astype(np.float32)
    y = np.arange(40) % 4
    save(tmp_path / "d.npz", x=x, y=y)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load read the whole archive"))
    data = load_data(str(tmp_path / "d.npz"), n=6)
    assert torch.equal(data.x, torch.from_numpy(x[:6])) and data.y.tolist() == y[:6].tolist()
    assert torch.equal(load_data(str(tmp_path / "d.npz")).x, torch.from_numpy(x))  # without n: every row


def test_n_keeps_npz_length_checks(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 3), np.float32), y=np.zeros(8, np.int64))
    with pytest.raises(InputError, match="10 inputs but 8 labels"):
        load_data(str(tmp_path / "d.npz"), n=5)
    with pytest.raises(InputError, match="10 inputs but 8 labels"):
        load_data((np.zeros((10, 3)), np.zeros(8)), n=5)


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "4"])
def test_bad_n_is_refused(n):
    with pytest.raises(InputError, match="^n: must be a positive number"):
        load_data("digits", n=n)
