"""The demo model: a small CNN trained on scikit-learn's digits, cached on disk after first use."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TypedDict

from robustlab.data import digits_split
from robustlab.training import accuracy, seeded_init, train_classifier
from robustlab.zoo import DigitsCNN

class Recipe(TypedDict):
    """How the demo CNN is trained; written beside the cached weights, its version names the file."""

    model: str
    data: str
    epochs: int
    lr: float
    batch_size: int
    seed: int
    version: int


RECIPE: Recipe = {"model": "DigitsCNN(width=16)", "data": "digits:train", "epochs": 40, "lr": 3e-3, "batch_size": 64,
          "seed": 0, "version": 2}


def cache_dir() -> Path:
    root = os.environ.get("ROBUSTLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "robustlab")
    return Path(root)


def digits_cnn(*, retrain: bool = False) -> tuple[DigitsCNN, Path]:
    """The trained demo CNN (eval mode) and the safetensors file it is cached in."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"digits-cnn-v{RECIPE['version']}.safetensors"
    model = seeded_init(DigitsCNN, RECIPE["seed"])
    if path.exists() and not retrain:
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval(), path
        except Exception:  # noqa: BLE001 - a corrupt cache is rebuilt, not fatal
            pass
    train = digits_split("train")
    train_classifier(model, train, epochs=RECIPE["epochs"], lr=RECIPE["lr"], batch_size=RECIPE["batch_size"],
                     seed=RECIPE["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic write: a concurrent or interrupted run never leaves a half-written cache file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = dict(RECIPE, test_accuracy=accuracy(model, digits_split("test")))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return model.eval(), path
