"""Evaluation data: the embedded digits set, .npz files, or a user function; validated once.

A data SPEC is one of
- "digits": scikit-learn's handwritten digits (1x8x8, values scaled to [0, 1]), the held-out split;
- "breast-cancer": scikit-learn's breast-cancer data (30 tabular features, standardised on the training
  split and scaled into [0, 1]), the held-out 30%, with sklearn's feature and class names
  ("breast-cancer:train" for the rest);
- a path to an .npz with arrays `x` and `y` (loaded without pickle);
- a folder of images, one subfolder per class (robustlab.image_folder: PNG/JPEG through Pillow,
  class names from the folder names, `image_size` to resize);
- "pkg.module:function" or "path/to/file.py:function" returning (x, y) arrays/tensors, a
  torch Dataset of (x, y) pairs, or a DataLoader.

`n` keeps the first n samples and is applied while reading: a Dataset's items beyond n are never
fetched, a DataLoader stops after the batch that completes n, an image folder opens only n files
(spread over the classes, see robustlab.image_folder), an .npz reads only n rows of each array.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from robustlab.errors import InputError
from robustlab.imports import load_object

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25


@dataclass
class Dataset:
    """Inputs and integer labels on the CPU, plus where they came from."""

    x: torch.Tensor
    y: torch.Tensor
    source: str
    classes: list[str] | None = None
    indices: torch.Tensor | None = None  # sample ids (position in the source data)
    features: list[str] | None = None  # names of a 1-D input's features (tabular data), shown in reports

    def __post_init__(self) -> None:
        if self.indices is None:
            self.indices = torch.arange(len(self.x))

    def __len__(self) -> int:
        return len(self.x)

    def head(self, n: int | None) -> "Dataset":
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise InputError("n", f"must be a positive number of samples, got {n}")
        indices = self.indices if self.indices is not None else torch.arange(len(self.x))
        return Dataset(self.x[:n], self.y[:n], self.source, self.classes, indices[:n], self.features)

    def with_features(self, names: Any) -> "Dataset":
        """The same data with feature names (one per feature of 1-D inputs), checked."""
        if names is None:
            return self
        if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
            raise InputError("features", f"expected a list of non-empty names, got {names!r}"[:200])
        names = [n.strip() for n in names]
        if self.x.dim() != 2:
            raise InputError("features", f"feature names are for 1-D (tabular) inputs; these have shape "
                                         f"{tuple(self.x.shape[1:])}")
        if len(names) != self.x.shape[1]:
            raise InputError("features", f"expected {self.x.shape[1]} names (one per feature), got {len(names)}")
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise InputError("features", f"each name may appear once, got {twice!r} twice")
        return Dataset(self.x, self.y, self.source, self.classes, self.indices, names)

    def fingerprint(self) -> str:
        """sha256 of the float32 inputs and int64 labels, in order."""
        h = hashlib.sha256()
        h.update(str(tuple(self.x.shape)).encode())
        for values in (self.x.detach().to(torch.float32), self.y.detach().to(torch.int64)):  # views: no copy
            h.update(values.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()

    def describe(self) -> dict:
        about = {"source": self.source, "n": len(self), "input_shape": list(self.x.shape[1:]),
                 "sha256": self.fingerprint(), "classes_present": sorted(set(self.y.tolist()))}
        if self.features:
            about["features"] = list(self.features)
        return about


def digits_split(split: str = "test") -> Dataset:
    """scikit-learn's digits as 1x8x8 images in [0, 1]; a fixed stratified split (75/25)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.ascontiguousarray((bunch.images / 16.0).astype(np.float32)[:, None])  # standard layout, like iterates
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(x))
    train_idx, test_idx = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
                                           stratify=y)
    if split not in ("train", "test"):
        raise InputError("split", f"expected 'train' or 'test', got {split!r}")
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return Dataset(torch.from_numpy(x[chosen]), torch.from_numpy(y[chosen]), f"digits:{split}",
                   classes=[str(i) for i in range(10)], indices=torch.from_numpy(chosen))


BREAST_CANCER_SEED = 0
BREAST_CANCER_TEST_FRACTION = 0.3


def breast_cancer_split(split: str = "test") -> Dataset:
    """scikit-learn's breast-cancer data (30 features), standardised with the training split's mean and std,
    then scaled by the training split's range into [0, 1] (clipped), so it fits the default bounds; a fixed
    stratified split (70/30). Carries sklearn's feature names and class names."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise InputError("split", f"expected 'train' or 'test', got {split!r}")
    bunch = load_breast_cancer()
    idx = np.arange(len(bunch.data))
    train_idx, test_idx = train_test_split(idx, test_size=BREAST_CANCER_TEST_FRACTION, random_state=BREAST_CANCER_SEED,
                                           stratify=bunch.target)
    train = bunch.data[train_idx]
    z_train = (train - train.mean(0)) / train.std(0)
    z = (bunch.data - train.mean(0)) / train.std(0)
    low, high = z_train.min(0), z_train.max(0)
    x = np.clip((z - low) / (high - low), 0.0, 1.0).astype(np.float32)
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return Dataset(torch.from_numpy(x[chosen]), torch.from_numpy(bunch.target[chosen].astype(np.int64)),
                   f"breast-cancer:{split}", classes=[str(c) for c in bunch.target_names],
                   indices=torch.from_numpy(chosen), features=[str(f) for f in bunch.feature_names])


def load_data(spec: Any, *, trust_pickle: bool = False, n: int | None = None,
              image_size: Any = None) -> Dataset:
    """Resolve a data SPEC (see module doc) or in-memory data into a `Dataset`.

    n: keep the first n samples, read no more than those (see the module doc).
    image_size: H, (H, W) or "H,W": resize an image folder's images (CLI: --image-size)."""
    n = check_n(n)
    if image_size is not None and not (isinstance(spec, str) and os.path.isdir(spec)):
        raise InputError("image_size", "resizes the images of an image folder (--data DIR/); the data is not one")
    if isinstance(spec, Dataset):
        return spec.head(n)
    if isinstance(spec, (str, os.PathLike)) and not isinstance(spec, str):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        if spec in ("digits", "digits:test"):
            return digits_split("test").head(n)
        if spec == "digits:train":
            return digits_split("train").head(n)
        if spec in ("breast-cancer", "breast-cancer:test", "breast-cancer:train"):
            return breast_cancer_split("train" if spec.endswith(":train") else "test").head(n)
        if os.path.isdir(spec) and not spec.endswith(".npz"):
            from robustlab.image_folder import load_image_folder

            return load_image_folder(spec, n=n, image_size=image_size)
        if spec.endswith(".npz") or (os.path.exists(spec) and not _looks_like_object_spec(spec)):
            return _load_npz(spec, trust_pickle=trust_pickle, n=n)
        if _looks_like_object_spec(spec):
            obj = load_object(spec, argument="data")
            produced = obj() if callable(obj) and not isinstance(obj, torch.utils.data.Dataset) else obj
            return from_object(produced, source=spec, n=n)
        raise InputError("data", f"{spec!r} is neither 'digits', 'breast-cancer', an existing .npz file, an image "
                                 "folder, nor 'module:function'")
    return from_object(spec, source="in-memory", n=n)


def check_n(n: Any) -> int | None:
    """None or a positive number of samples; InputError naming n otherwise."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError("n", f"must be a positive number of samples, got {n!r}")
    return int(n)


def _looks_like_object_spec(spec: str) -> bool:
    head, sep, tail = spec.rpartition(":")
    return bool(sep) and bool(head) and tail.isidentifier() and not os.path.exists(spec)


def _load_npz(path: str, *, trust_pickle: bool, n: int | None = None) -> Dataset:
    if not os.path.exists(path):
        raise InputError("data", f"file not found: {path}")
    if os.path.isdir(path):
        raise InputError("data", f"{path} is a directory; expected 'digits', an .npz file with arrays x and y, or "
                                 "'module:function' returning arrays, a Dataset or a DataLoader")
    import zipfile

    if not zipfile.is_zipfile(path):
        raise InputError("data", f"cannot read {path}: not an .npz archive (np.savez writes one)")
    head = _npz_head(path, n)
    if head is not None:
        return from_object(head, source=os.path.basename(path))
    try:
        with np.load(path, allow_pickle=trust_pickle) as arrays:
            missing = {"x", "y"} - set(arrays.files)
            if missing:
                raise InputError("data", f"{path} must contain arrays 'x' and 'y'; it has {sorted(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
    except InputError:
        raise
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise InputError("data", f"{path} stores object arrays that need unpickling; refused "
                                     "(pass trust_pickle / --trust-pickle only for files you trust)") from None
        raise InputError("data", f"cannot read {path}: {error}") from None
    except Exception as error:  # noqa: BLE001 - zip/format errors of all kinds
        raise InputError("data", f"cannot read {path} as .npz: {error}") from None
    return from_object((x, y), source=os.path.basename(path), n=n)


def _npz_head(path: str, n: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The first n rows of x and y, read from the archive's .npy headers without loading the rest; None
    where that is not possible (object arrays, Fortran order, an unknown format), for np.load to handle."""
    import zipfile

    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
            if not {"x", "y"} <= set(members):
                return None
            lengths = {}
            for key in ("x", "y"):
                with archive.open(members[key]) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        return None
                    if dtype.hasobject or fortran or not shape:
                        return None
                    lengths[key] = shape[0]
                    rows = shape[0] if n is None else min(n, shape[0])
                    count = rows * int(np.prod(shape[1:], dtype=np.int64))
                    array = np.empty((rows, *shape[1:]), dtype=dtype)
                    view, done = array.reshape(-1).view(np.uint8).data, 0  # the array's own bytes
                    while done < len(view):
                        chunk = f.read(min(len(view) - done, 1 << 24))
                        if not chunk:
                            raise InputError("data", f"cannot read {path}: array {key!r} is truncated")
                        view[done:done + len(chunk)] = chunk
                        done += len(chunk)
                    arrays[key] = array
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - np.load reports what is wrong with the archive
        return None
    if lengths["x"] != lengths["y"]:
        raise InputError("data", f"{os.path.basename(path)}: {lengths['x']} inputs but {lengths['y']} labels")
    return arrays["x"], arrays["y"]


def from_object(obj: Any, *, source: str, n: int | None = None) -> Dataset:
    """(x, y) pair, a torch Dataset, or a DataLoader -> Dataset; with `n`, only the first n samples are
    read (a Dataset's items beyond n are never fetched, a DataLoader is left after the batch reaching n)."""
    n = check_n(n)
    if isinstance(obj, dict) and {"x", "y"} <= set(obj):
        obj = (obj["x"], obj["y"])
    if isinstance(obj, torch.utils.data.DataLoader):
        xs, ys = [], []
        taken = 0
        for batch in obj:
            bx, by = _pair(batch, source)
            xs.append(_tensor(bx, "x"))
            ys.append(_tensor(by, "y").reshape(-1))
            taken += len(xs[-1])
            if n is not None and taken >= n:
                break
        if not xs:
            raise InputError("data", f"{source}: the DataLoader yielded no batches")
        x_all, y_all = torch.cat(xs), torch.cat(ys)
        if n is not None and len(x_all) == len(y_all):
            x_all, y_all = x_all[:n], y_all[:n]
        return _checked(x_all, y_all, source)
    if isinstance(obj, torch.utils.data.Dataset) and not isinstance(obj, (tuple, list)):
        try:
            length = len(obj)  # type: ignore[arg-type]
        except TypeError:
            raise InputError("data", f"{source}: the Dataset has no length; return a DataLoader instead") from None
        if length == 0:
            raise InputError("data", f"{source}: the Dataset is empty")
        items = [_pair(obj[i], source) for i in range(length if n is None else min(n, length))]
        try:
            x = torch.stack([_tensor(a, "x") for a, _ in items])
        except RuntimeError as error:
            raise InputError("x", f"{source}: the Dataset's inputs differ in shape ({_first_line(error)})") from None
        y = _tensor([_scalar(b) for _, b in items], "y")
        return _checked(x, y, source)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
        if n is not None and _length(x) is not None and _length(y) is not None:
            if _length(x) != _length(y):
                raise InputError("data", f"{source}: {len(x)} inputs but {len(y)} labels")
            x, y = x[:n], y[:n]
        return _checked(_tensor(x, "x"), _tensor(y, "y"), source)
    raise InputError("data", f"{source}: expected (x, y) arrays, a torch Dataset or a DataLoader, "
                             f"got {type(obj).__name__}")


def _length(value: Any) -> int | None:
    try:
        return len(value)
    except TypeError:  # a scalar, a 0-dim array
        return None


def _pair(item: Any, source: str) -> tuple[Any, Any]:
    if isinstance(item, dict):
        for xk, yk in (("x", "y"), ("input", "label"), ("image", "label"), ("inputs", "labels")):
            if xk in item and yk in item:
                return item[xk], item[yk]
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    raise InputError("data", f"{source}: each item must be an (input, label) pair, got {type(item).__name__}")


def _scalar(label: Any) -> Any:
    """One sample's label as a Python value (a one-element tensor or array -> its item)."""
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        return label.item()
    if isinstance(label, np.ndarray) and label.size == 1:
        return label.item()
    return label


def _tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        array = np.asarray(value)
    except Exception as error:  # noqa: BLE001
        raise InputError(name, f"cannot be read as an array: {_first_line(error)}") from None
    what = "labels" if name == "y" else "inputs"
    if array.dtype.kind in "USa":
        first = array.reshape(-1)[0] if array.size else ""
        hint = ("; map the names to class indices 0..K-1 and pass the names as classes=[...] (CLI: --classes)"
                if name == "y" else "")
        raise InputError(name, f"the {what} are strings (e.g. {str(first)[:40]!r}); expected "
                               f"{'integer class indices' if name == 'y' else 'numbers'}{hint}")
    if array.dtype == object:
        raise InputError(name, f"the {what} are an object array (ragged or mixed types); expected numbers")
    if array.dtype.kind not in "biufc":
        raise InputError(name, f"the {what} have dtype {array.dtype}; expected numbers")
    return torch.from_numpy(np.ascontiguousarray(array))


def _labels(y: torch.Tensor, source: str) -> torch.Tensor:
    """Integer class indices as int64: integral floats and booleans are converted, anything else refused."""
    if y.is_complex():
        raise InputError("y", f"{source}: labels are complex numbers; expected integer class indices")
    if y.dtype == torch.bool:
        return y.to(torch.int64)
    if y.is_floating_point():
        y64 = y.double()
        bad = ~torch.isfinite(y64) | (y64 != y64.round())
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise InputError("y", f"{source}: labels must be integer class indices; {int(bad.sum())} of {len(y)} are "
                                  f"not whole numbers (e.g. {float(y64[i]):g} at sample {i}). Probabilities or "
                                  "one-hot rows? pass their argmax")
        return y64.to(torch.int64)
    return y.to(torch.int64)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _checked(x: torch.Tensor, y: torch.Tensor, source: str) -> Dataset:
    if x.dim() < 2:
        raise InputError("x", f"{source}: expected a batch of inputs (samples first), got shape {tuple(x.shape)}")
    if y.dim() > 1 and y.shape[1:].numel() == 1:
        y = y.reshape(-1)
    if y.dim() != 1:
        raise InputError("y", f"{source}: expected one integer label per sample, got shape {tuple(y.shape)}"
                              + ("; one-hot labels? use y.argmax(1)" if y.dim() == 2 else ""))
    if len(x) != len(y):
        raise InputError("data", f"{source}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise InputError("data", f"{source}: no samples")
    y = _labels(y, source)
    if x.dtype in (torch.float64, torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    return Dataset(x.cpu(), y.cpu(), source)
