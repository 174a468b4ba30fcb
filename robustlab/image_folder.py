"""An image folder as evaluation data: one subfolder per class, PNG/JPEG images read with Pillow.

    DATA/
      cat/  001.png  002.jpg ...
      dog/  001.png ...

- Classes: the subfolders' names, sorted (class index = position); hidden folders are ignored.
  Images: files ending in .png, .jpg or .jpeg (any case), sorted by name; other files are ignored.
- Order: round-robin over the classes (the first image of every class, then the second of every
  class, ...), so the first N samples (--n) are spread over the classes, and only those N files are
  opened. A sample's id is its position in that order.
- Channels: 1 (grayscale) when every image read is grayscale (Pillow modes 1, L, LA, I, I;16, F), else 3
  (RGB: grayscale images repeated over the channels, palettes expanded, alpha dropped).
- Values: scaled into [0, 1] (8-bit by 255, 16/32-bit integer by 65535, float images clipped), float32,
  shape (N, C, H, W).
- Size: every image must have the same size, unless `image_size` (H, W) resizes them all (bilinear).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from robustlab.errors import InputError

EXTENSIONS = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")


def parse_image_size(value: Any) -> tuple[int, int] | None:
    """None, H, (H, W), "H" or "H,W" -> (H, W); InputError naming image_size otherwise."""
    if value is None:
        return None
    parts: Sequence[Any]
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    else:
        parts = list(value) if isinstance(value, (tuple, list)) else [value]
    try:
        sizes = [int(p) for p in parts]
        if any(isinstance(p, bool) or (isinstance(p, float) and not p.is_integer()) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError("image_size", f"expected H or H,W (positive integers), got {value!r}") from None
    if len(sizes) not in (1, 2) or any(s < 1 for s in sizes):
        raise InputError("image_size", f"expected H or H,W (positive integers), got {value!r}")
    return (sizes[0], sizes[-1])


def list_images(root: str) -> tuple[list[str], list[list[Path]]]:
    """(class names, per class its image files), both sorted; InputError for a folder that is not one."""
    path = Path(root)
    try:
        entries = sorted(path.iterdir(), key=lambda p: p.name)
    except OSError as error:
        raise InputError("data", f"cannot list {root}: {error.strerror or error}") from None
    visible = [e for e in entries if not e.name.startswith(".")]
    if not visible:
        raise InputError("data", f"{root} is empty; expected an image folder with one subfolder per class "
                                 "(e.g. cat/, dog/) holding PNG or JPEG images")
    folders = [e for e in visible if e.is_dir()]
    if not folders:
        loose = [e.name for e in visible if e.suffix.lower() in EXTENSIONS]
        what = f"images ({loose[0]}, ...) but no class subfolders" if loose else "no class subfolders"
        raise InputError("data", f"{root} holds {what}; expected one subfolder per class (e.g. {root}/cat/*.png), "
                                 "named after the class")
    files = []
    for folder in folders:
        try:
            images = sorted((f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                             and f.suffix.lower() in EXTENSIONS), key=lambda p: p.name)
        except OSError as error:
            raise InputError("data", f"cannot list {folder}: {error.strerror or error}") from None
        if not images:
            raise InputError("data", f"class folder {folder} holds no PNG or JPEG images")
        files.append(images)
    return [f.name for f in folders], files


def round_robin(files: list[list[Path]]) -> list[tuple[int, Path]]:
    """(class, file) in the documented order: image i of every class before image i + 1 of any."""
    order = []
    for i in range(max(len(f) for f in files)):
        order += [(label, images[i]) for label, images in enumerate(files) if i < len(images)]
    return order


def load_image_folder(root: str, *, n: int | None = None, image_size: Any = None):
    """The folder's images as a robustlab Dataset (see the module doc); only the first n files are read."""
    from robustlab.data import Dataset

    size = parse_image_size(image_size)
    classes, files = list_images(root)
    order = round_robin(files)
    if n is not None:
        order = order[:n]
    images = [_read(path) for _, path in order]
    gray = all(img.mode in GRAY_MODES for img in images)
    arrays = [_pixels(img, gray, size) for img in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        other = next(i for i, a in enumerate(arrays) if a.shape != first)
        raise InputError("data", f"images differ in size: {order[0][1]} is {first[2]}x{first[1]} (WxH), "
                                 f"{order[other][1]} is {arrays[other].shape[2]}x{arrays[other].shape[1]}; pass "
                                 "--image-size H[,W] (image_size=) to resize them")
    x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
    y = torch.tensor([label for label, _ in order], dtype=torch.int64)
    return Dataset(x, y, f"images:{os.path.basename(os.path.normpath(root))}", classes=classes)


def _read(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy() if img.mode != "P" else img.convert("RGBA" if "transparency" in img.info else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        text = str(error).strip().splitlines()
        raise InputError("data", f"cannot read image {path}: {text[0][:200] if text else type(error).__name__}") \
            from None


def _pixels(img: Any, gray: bool, size: tuple[int, int] | None) -> np.ndarray:
    """(C, H, W) float32 in [0, 1]."""
    from PIL import Image

    if gray and (img.mode.startswith("I") or img.mode == "F"):  # 16/32-bit integer or float grayscale
        scale = 1.0 if img.mode == "F" else 65535.0
        img = img.convert("F")
    elif gray:
        img, scale = img.convert("L"), 255.0
    else:
        img, scale = img.convert("RGB"), 255.0
    if size is not None:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.float32) / scale
    array = np.clip(array, 0.0, 1.0)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
