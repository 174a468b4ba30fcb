"""The audit's journal: every finished attack call on disk, so a killed audit resumes where it stopped.

A unit of work is one top-level attack call (attacks.base.Attack.__call__: one model, attack, eps and
target set over all shards; a cascade's members are units of their own). When a journal is active,
each call first looks for its unit and, if found, returns the stored outcome instead of attacking;
otherwise it attacks and stores the outcome. Units are keyed by their position in the run (the
audit is deterministic: the k-th call of a resumed run is the k-th of the first) and a digest of
everything the outcome depends on (model, attack configuration, inputs, labels, targets, sample
ids, seed), so a unit is only ever reused for exactly the same work.

Layout, beside the results directory OUT (it survives the swap that writes OUT, robustlab.atomic):

    .OUT.robustlab-journal/manifest.json     what the audit is: configuration, models, data digest
    .OUT.robustlab-journal/units/000012-<digest>.npz

Each unit is written atomically (a hidden name, fsync, rename), so a kill leaves whole units only.
A journal whose manifest differs from the run's (another configuration, other weights or data) is
refused, never mixed. Unit files hold raw tensor bytes and a JSON header read with
allow_pickle=False: nothing is unpickled. Under torch.distributed only rank 0 writes and reads;
the others receive each unit's bytes by broadcast (robustlab.distributed), so ranks need no
shared filesystem.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from robustlab import atomic, distributed
from robustlab.errors import InputError
from robustlab.log import get_logger

_log = get_logger(__name__)
SUFFIX = "robustlab-journal"
_ACTIVE: contextvars.ContextVar["Journal | None"] = contextvars.ContextVar("robustlab_journal", default=None)
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("robustlab_journal_depth", default=0)


@dataclasses.dataclass(frozen=True)
class Request:
    """A journal to open once the audit knows what it is (its identity): where, which argument to name in
    errors, and whether it must already exist (--resume)."""

    directory: Path
    argument: str = "journal"
    must_exist: bool = False


def journal_dir(out: str | Path) -> Path:
    """Where the journal of an audit writing `out` lives: a hidden directory beside it."""
    target = Path(out)
    return target.parent / f".{target.name}.{SUFFIX}"


def finished_units(directory: str | Path) -> int:
    """How many finished attack calls a journal holds (0 where there is none)."""
    return len(list(Path(directory, "units").glob("*.npz")))


def discard(directory: str | Path, *, unless_finished: bool = False) -> None:
    """Delete a journal (on rank 0): after its results were saved, for --fresh, or, with
    `unless_finished`, only when it holds no finished call (an interrupt with nothing to resume)."""
    if distributed.is_main() and not (unless_finished and finished_units(directory)):
        shutil.rmtree(directory, ignore_errors=True)


class Journal:
    """An audit's finished units on disk (see the module docstring)."""

    def __init__(self, directory: str | Path, identity: dict, *, argument: str = "--out",
                 must_exist: bool = False) -> None:
        self.directory = Path(directory)
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        self.argument = argument
        self.index = 0
        self.found = self._open(must_exist)
        if self.found:
            _log.info("resuming the interrupted audit in %s: %d attack calls already finished", self.directory,
                      self.found)

    # ------------------------------------------------------------------ manifest
    def _open(self, must_exist: bool) -> int:
        """Checks or writes the manifest; returns how many finished units are already there."""
        manifest = self.directory / "manifest.json"
        problem: str | None = None
        count = 0
        if distributed.is_main():
            if manifest.is_file():
                try:
                    stored = json.loads(manifest.read_text())
                except (OSError, ValueError) as error:
                    problem = f"the journal {self.directory} is unreadable ({error}); delete it to start over"
                else:
                    differs = _differences(stored.get("identity"), self.identity)
                    if differs:
                        start_over = "pass --fresh (or delete it)" if self.argument.startswith("--") else \
                            "delete it or use another journal directory"
                        problem = (f"{self.directory} holds an interrupted audit of another configuration "
                                   f"(differs in: {', '.join(differs)}); results are never mixed: rerun that "
                                   f"audit to finish it, or {start_over} to start over")
                    else:
                        count = finished_units(self.directory)
            elif must_exist:
                problem = f"there is no interrupted audit to resume ({self.directory} does not exist)"
            else:
                try:
                    (self.directory / "units").mkdir(parents=True, exist_ok=True)
                    atomic.write_atomically(manifest, (json.dumps({"identity": self.identity}, indent=2,
                                                                  sort_keys=True) + "\n").encode())
                except OSError as error:
                    problem = f"cannot write the journal {self.directory}: {error.strerror or error}"
        shared = distributed.broadcast_bytes(json.dumps({"problem": problem, "count": count}).encode())
        assert shared is not None
        state = json.loads(shared.decode())
        if state["problem"]:
            raise InputError(self.argument, state["problem"])
        return int(state["count"])

    # ------------------------------------------------------------------ units
    def _path(self, index: int, digest: str) -> Path:
        return self.directory / "units" / f"{index:06d}-{digest}.npz"

    def load(self, digest: str) -> Any | None:
        """The next unit's stored outcome if it exists (same position, same digest), else None."""
        path = self._path(self.index, digest)
        data = None
        if distributed.is_main() and path.is_file():
            try:
                data = path.read_bytes()
            except OSError:
                data = None
        data = distributed.broadcast_bytes(data)
        if data is None:
            return None
        try:
            return decode(data)
        except (ValueError, KeyError, OSError) as error:  # a damaged unit is recomputed, never trusted
            _log.warning("journal unit %s is unreadable (%s); recomputing it", path.name, error)
            return None

    def store(self, digest: str, outcome: Any) -> None:
        if distributed.is_main():
            atomic.write_atomically(self._path(self.index, digest), lambda handle: write(outcome, handle))


@contextlib.contextmanager
def active(journal: Journal | None) -> Iterator[Journal | None]:
    """Attack calls inside the block use `journal` (None: no journal)."""
    token = _ACTIVE.set(journal)
    try:
        yield journal
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def unit(attack: Any, model: Any, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
         sample_ids: torch.Tensor, seed: int) -> Iterator["_Unit"]:
    """One attack call: `u.outcome` is the stored outcome (reuse it) or None (attack, then u.record)."""
    journal = _ACTIVE.get()
    depth = _DEPTH.get()
    token = _DEPTH.set(depth + 1)
    try:
        if journal is None or depth > 0:  # calls made inside another call belong to that unit
            yield _Unit(None, None, None)
            return
        digest = unit_digest(attack, model, x, y, targets, sample_ids, seed)
        stored = journal.load(digest)
        u = _Unit(journal, digest, stored)
        yield u
        journal.index += 1
    finally:
        _DEPTH.reset(token)


@dataclasses.dataclass
class _Unit:
    journal: Journal | None
    digest: str | None
    outcome: Any | None

    def record(self, outcome: Any) -> None:
        if self.journal is not None and self.digest is not None:
            self.journal.store(self.digest, outcome)


def unit_digest(attack: Any, model: Any, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
                sample_ids: torch.Tensor, seed: int) -> str:
    """What an attack call's outcome depends on, as 16 hex digits."""
    h = hashlib.blake2b(digest_size=8)
    describe = {"attack": attack.config(), "model": [type(model).__name__, getattr(model, "name", ""),
                                                     type(getattr(model, "module", None)).__name__,
                                                     model.sha256() if hasattr(model, "sha256") else ""],
                "seed": seed}
    h.update(json.dumps(describe, sort_keys=True, default=str).encode())
    for t in (x, y, targets, sample_ids):
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------- (de)serialising outcomes
def encode(outcome: Any) -> bytes:
    """An AttackOutcome (or subclass) as npz bytes (see `write`)."""
    buffer = io.BytesIO()
    write(outcome, buffer)
    return buffer.getvalue()


def write(outcome: Any, handle: Any) -> None:
    """An AttackOutcome (or subclass) as an npz written to `handle`: raw tensor bytes (views, no copies),
    and a JSON header of the rest."""
    header: dict[str, Any] = {"type": type(outcome).__name__, "fields": {}, "tensors": {}}
    arrays: dict[str, np.ndarray] = {}
    for f in dataclasses.fields(outcome):
        value = getattr(outcome, f.name)
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            header["tensors"][f.name] = [str(t.dtype).replace("torch.", ""), list(t.shape)]
            arrays[f.name] = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
        else:
            header["fields"][f.name] = value
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(handle, **arrays)  # type: ignore[arg-type]


def decode(data: bytes) -> Any:
    from robustlab.attacks.base import AttackOutcome
    from robustlab.attacks.cascade import CascadeOutcome

    kinds = {"AttackOutcome": AttackOutcome, "CascadeOutcome": CascadeOutcome}
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        header = json.loads(archive["header"].tobytes().decode())
        values = dict(header["fields"])
        for name, (dtype, shape) in header["tensors"].items():
            raw = torch.from_numpy(archive[name].copy())
            kind = getattr(torch, dtype)
            values[name] = raw.view(kind).reshape(shape) if raw.numel() else torch.empty(shape, dtype=kind)
    cls = kinds[header["type"]]
    return cls(**values)


def _differences(stored: Any, current: dict, prefix: str = "") -> list[str]:
    """Top-level (and model-level) keys whose values differ between two identities."""
    if not isinstance(stored, dict):
        return ["everything (no identity recorded)"]
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and prefix.count(".") < 2:
            out += _differences(a, b, prefix=f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out
