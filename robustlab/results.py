"""Audit results: tidy frames plus run metadata, saved as results.json + samples.csv.

This module imports pandas and the standard library only, never torch: reports and CI
comparisons read saved results without a model or a re-run.

Contract (documented in README.md):
- results.json: {"schema", "metadata": {...}, "summary": [one record per (model, attack, norm,
  eps, targeted)]}; NaN is written as null. metadata["evaluation"] and metadata["requirements"]
  hold the verdicts (robustlab.verdicts); files of schema /1 are upgraded when loaded.
- samples.csv: one row per (model, sample, attack, eps, target).
- examples.npz: a few clean and adversarial inputs for reports (see `example_key`), and the maps
  of the explanation stage (`explain|KIND|MODEL|KEY`).
- NAME.csv for each extra table (the explanation stage's frames, e.g. explain_saliency.csv),
  listed in metadata["tables"].
- results.json's "files": {path relative to the directory: sha256 hex} of every other file the
  directory holds (the above, report.html, summary.md, models/...). `load` refuses a directory
  whose files do not match it (a mix of two runs, a file changed or missing); results saved
  before it existed load as unverified (`AuditResult.verified` False, an UnverifiedResultsWarning).

Saving is all or nothing: the new directory is written in full beside the target and swapped in
(robustlab.atomic), so the target is at every instant the old complete result or the new one, and
holds exactly the new result's files. A target that holds files robustlab did not write is refused
rather than replaced (the swap would delete them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from robustlab import atomic
from robustlab.errors import InputError

SCHEMA = "robustlab.results/2"
SCHEMAS_READ = ("robustlab.results/1", SCHEMA)  # /1 (no evaluation status, verdict "robust") is upgraded on load
WORST_CASE = "worst-case"
FILES = "files"  # results.json's key: {relative path: sha256} of every other file in the directory
RESULT_FILES = ("results.json", "samples.csv", "examples.npz", "report.html", "summary.md")  # + tables, models/
DERIVED = ("report.html", "summary.md")  # views rendered from the others: may be deleted, never mixed in


class UnverifiedResultsWarning(UserWarning):
    """A results directory saved without file digests (before robustlab recorded them): its files
    cannot be checked against each other."""
CERTIFIED = "certified:"  # prefix of the certificate rows (robustlab.certify): "certified:crown", ...


def is_certified(attack: Any) -> bool:
    """A certificate row ("certified:ibp", "certified:crown", "certified:smoothing(sigma=0.25)"): a lower
    bound in `certified_accuracy`, never an attack (it joins no worst case; its robust_accuracy is NaN)."""
    return isinstance(attack, str) and attack.startswith(CERTIFIED)


def certified_label(method: str, sigma: float | None = None) -> str:
    return f"{CERTIFIED}{method}" + (f"(sigma={sigma:g})" if method == "smoothing" else "")

SUMMARY_COLUMNS = ["model", "attack", "norm", "eps", "targeted", "n", "clean_accuracy", "robust_accuracy",
                   "certified_accuracy", "success_rate", "n_attacked", "median_l2", "median_linf", "gradient_calls",
                   "seconds"]
SAMPLE_COLUMNS = ["model", "sample", "attack", "norm", "eps", "targeted", "target", "label", "clean_pred",
                  "adv_pred", "adv_confidence", "clean_correct", "attacked", "success", "robust", "l2", "linf"]
_SAMPLE_DTYPES = {"model": "string", "sample": "int64", "attack": "string", "norm": "string", "eps": "float64",
                  "targeted": "string", "target": "Int64", "label": "int64", "clean_pred": "int64",
                  "adv_pred": "int64", "adv_confidence": "float64", "clean_correct": "bool", "attacked": "bool",
                  "success": "bool", "robust": "bool", "l2": "float64", "linf": "float64"}


@dataclass
class AuditResult:
    """What an audit found. `summary` and `samples` are pandas DataFrames; `metadata` a dict."""

    summary: pd.DataFrame
    samples: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)
    examples: dict[str, np.ndarray] = field(default_factory=dict)  # see `example_key`; saved as examples.npz
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # extra tidy frames, saved as NAME.csv
    # loaded from disk: True when every file matched results.json's digests, False when it had none
    verified: bool | None = field(default=None, compare=False, repr=False)

    # ---------------------------------------------------------------- queries
    def robust_accuracy(self, *, attack: str = WORST_CASE, eps: float | None = None, model: str | None = None,
                        targeted: str = "none") -> float:
        """One figure from the summary; raises if the selection is empty or ambiguous."""
        rows = self.summary[(self.summary["attack"] == attack) & (self.summary["targeted"] == targeted)]
        if model is not None:
            rows = rows[rows["model"] == model]
        if eps is not None:
            rows = rows[(rows["eps"] - eps).abs() <= 1e-12 * max(1.0, abs(eps))]
        if len(rows) != 1:
            raise KeyError(f"{len(rows)} summary rows match attack={attack!r}, eps={eps!r}, model={model!r}, "
                           f"targeted={targeted!r}; name them more precisely")
        return float(rows["robust_accuracy"].iloc[0])

    def table(self) -> str:
        """Robust accuracy per model, targeted mode and attack (rows) and eps (columns), as text."""
        return format_table(self.summary)

    def __repr__(self) -> str:
        models = ", ".join(sorted(self.summary["model"].unique())) if len(self.summary) else "-"
        return f"AuditResult(models: {models}; {len(self.summary)} summary rows, {len(self.samples)} sample rows)\n{self.table()}"

    def _repr_html_(self) -> str:
        return self.summary.to_html(index=False, float_format=lambda v: f"{v:.4g}")

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike, *, also: Callable[[Path], None] | None = None) -> Path:
        """Write the result as a new directory and swap it in for `directory`: all or nothing, and the
        directory then holds exactly this result (see the module docstring).

        also(new_directory): writes more files into the new directory before it is swapped in (the
        CLI's models/ and report.html); they get their digests in results.json like the others.
        """
        target = Path(directory)
        check_output_dir(target)
        with new_version(target) as staging:
            self._write(staging)
            seal(staging)
            if also is not None:
                also(staging)
        return target

    def _write(self, directory: Path) -> None:
        metadata = dict(self.metadata, tables=sorted(self.tables)) if self.tables else self.metadata
        document = {"schema": SCHEMA, "metadata": metadata,
                    "summary": _records(self.summary.reindex(
                        columns=SUMMARY_COLUMNS + _extra(self.summary, SUMMARY_COLUMNS)))}
        text = json.dumps(_clean(document), indent=2, allow_nan=False) + "\n"
        for name in self.tables:
            _check_table_name(name)
        (directory / "results.json").write_text(text)
        self.samples.to_csv(directory / "samples.csv", index=False, float_format="%.9g")
        if self.examples:
            # mypy matches **examples to savez_compressed's allow_pickle: bool too; every value is an array
            np.savez_compressed(directory / "examples.npz", **self.examples)  # type: ignore[arg-type]
        for name, frame in self.tables.items():
            frame.to_csv(directory / f"{name}.csv", index=False, float_format="%.9g")


# ---------------------------------------------------------------------------- directories, digests
@contextmanager
def new_version(target: Path) -> Iterator[Path]:
    """An empty directory beside `target`; when the block ends without an exception it is sealed
    (digests into its results.json) and swapped in for `target`; otherwise it is removed."""
    try:
        target.parent.mkdir(mode=0o777, parents=True, exist_ok=True)
        atomic.remove_leftovers(target)
        staging = atomic.staging_dir(target)
    except OSError as error:
        raise InputError("out", f"cannot write beside {target}: {error.strerror or error}") from None
    try:
        yield staging
        seal(staging)
        atomic.sync(staging)
        atomic.swap_in(staging, target)
    except OSError as error:
        raise InputError("out", f"cannot write {target}: {error.strerror or error}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def seal(directory: Path) -> None:
    """Record in directory/results.json the sha256 of every other file the directory holds."""
    document = json.loads((directory / "results.json").read_text())
    document[FILES] = {_relative(path, directory): atomic.sha256(path) for path in atomic.files(directory)
                       if path != directory / "results.json"}
    atomic.write_atomically(directory / "results.json",
                            (json.dumps(document, indent=2, allow_nan=False) + "\n").encode())


def write_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write one file atomically. Into a results directory whose results.json records digests, as a
    new version of the whole directory with the file's digest added (how `robustlab report`
    re-renders report.html without leaving the directory mixed)."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    directory = path.parent
    try:
        if path.name != "results.json" and not atomic.is_staging(directory) and _digests(directory) is not None:
            verify(directory)  # never seal a directory that is already mixed or changed
            with new_version(directory) as staging:
                atomic.copy_tree(directory, staging)
                atomic.write_atomically(staging / path.name, raw)
        else:
            directory.mkdir(mode=0o777, parents=True, exist_ok=True)
            atomic.write_atomically(path, raw)
    except OSError as error:
        raise InputError("out", f"cannot write {path}: {error.strerror or error}") from None
    return path


def verify(directory: str | os.PathLike) -> bool:
    """Check a results directory's files against results.json's digests: True when they match,
    False when results.json records none (saved by an older robustlab); InputError (argument
    "results") for a missing, changed or unlisted file, i.e. a mixed or tampered directory."""
    path = Path(directory)
    document = _document(path)
    listed = document.get(FILES)
    if listed is None:
        return False
    where = path / "results.json"
    if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
        raise InputError("results", f"{where}: its '{FILES}' entry is not a table of file digests")
    for name, digest in listed.items():
        relative = PurePosixPath(name)
        if not name or relative.is_absolute() or ".." in relative.parts or name == "results.json":
            raise InputError("results", f"{where} lists a file outside the directory: {name!r}")
        file = path / relative
        if not file.is_file() and name in DERIVED:
            continue  # a deleted report or summary: a view of the results, re-rendered by `robustlab report`
        if not file.is_file():
            raise InputError("results", f"{path} is incomplete or mixed: results.json lists {name}, which is "
                                        "missing; re-run the audit (or restore the directory)")
        if atomic.sha256(file) != digest:
            raise InputError("results", f"{path} is mixed or was changed: {name} does not match the digest "
                                        "results.json records for it (a file from another run, or edited "
                                        "after the audit); re-run the audit (or restore the directory)")
    if not atomic.is_staging(path):
        tables = _table_names(document)
        for file in atomic.files(path):
            name = _relative(file, path)
            if name not in listed and name != "results.json" and _robustlab_name(name, tables):
                raise InputError("results", f"{path} is mixed: it holds {name}, which results.json does not list "
                                            "(a file from another run); re-run the audit into a new directory")
    return True


def unverified_note(directory: str | os.PathLike) -> str | None:
    """The line to show for results saved without digests; None when they have them."""
    try:
        if _digests(Path(directory)) is not None:
            return None
    except InputError:
        return None
    return (f"{directory} was saved without file digests (by a robustlab before they were recorded): "
            "its files are read unverified")


def _document(path: Path) -> dict:
    results = path / "results.json"
    try:
        document = json.loads(results.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError("results", f"cannot read {results}: {error}") from None
    if not isinstance(document, dict):
        raise InputError("results", f"{results} holds a JSON {type(document).__name__}, not a robustlab results "
                                    "document")
    return document


def _digests(directory: Path) -> dict | None:
    """results.json's digests, or None when there is no results.json or it records none."""
    if not (directory / "results.json").is_file():
        return None
    listed = _document(directory).get(FILES)
    return listed if isinstance(listed, dict) else None


def _relative(path: Path, directory: Path) -> str:
    return path.relative_to(directory).as_posix()


def _table_names(document: dict) -> list[str]:
    metadata = document.get("metadata")
    names = metadata.get("tables") if isinstance(metadata, dict) else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _robustlab_name(name: str, tables: list[str]) -> bool:
    """A file robustlab writes into a results directory (the others are the user's)."""
    return name in RESULT_FILES or name in {f"{t}.csv" for t in tables} or name.startswith("models/")


def check_output_dir(directory: str | os.PathLike) -> None:
    """Before any work: refuse an output path robustlab cannot (or must not) replace with a new result:
    a file, a non-empty directory that holds no robustlab results or files robustlab did not write
    (replacing the directory would delete them), a read-only directory, an unwritable parent."""
    path = Path(directory)
    if path.exists():
        if not path.is_dir():
            raise InputError("out", f"{path} exists and is not a directory")
        try:
            entries = list(path.iterdir())
        except OSError as error:
            raise InputError("out", f"cannot read {path}: {error.strerror or error}") from None
        if entries and not (path / "results.json").exists():
            raise InputError("out", f"{path} is not empty and holds no robustlab results; choose a new directory")
        if entries:
            foreign = _foreign_files(path)
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise InputError("out", f"{path} holds files robustlab did not write ({shown}); a new result "
                                        "replaces the whole directory, so move them or choose another directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError("out", f"{path} is read-only (no write permission)")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError("out", f"cannot write under {parent} (a new result is written beside {path.name} "
                                "and swapped in)")


def _foreign_files(path: Path) -> list[str]:
    """Files in an existing results directory that robustlab did not write."""
    try:
        document = _document(path)
    except InputError:
        document = {}
    listed = document.get(FILES)
    listed = set(listed) if isinstance(listed, dict) else set()
    tables = _table_names(document)
    out = []
    for file in atomic.files(path):
        name = _relative(file, path)
        if name in listed or _robustlab_name(name, tables) or _own_temporary(name):
            continue
        out.append(name)
    return out


def _own_temporary(name: str) -> bool:
    """A hidden temporary file of an interrupted single-file write (robustlab.atomic.write_atomically)."""
    base = PurePosixPath(name).name
    return base.startswith(".") and ".tmp-" in base


def load(directory: str | os.PathLike) -> AuditResult:
    """Read a results directory written by `AuditResult.save`, its files checked against the digests
    results.json records (InputError for a mixed or changed directory; an UnverifiedResultsWarning
    and `verified` False for results saved without digests)."""
    path = Path(directory)
    results, samples = path / "results.json", path / "samples.csv"
    if not path.exists():
        aside = atomic.interrupted_swap(path)
        if aside is not None:
            raise InputError("results", f"{path} does not exist; an interrupted save left the previous results "
                                        f"in {aside} (rename it back to use them)")
    if not results.exists():
        raise InputError("results", f"{path} has no results.json (not a robustlab results directory)")
    document = _document(path)
    if document.get("schema") not in SCHEMAS_READ:
        raise InputError("results", f"{results} has schema {document.get('schema')!r}; expected {SCHEMA!r}")
    if not isinstance(document.get("summary"), list):
        raise InputError("results", f"{results} has no summary records (not a complete robustlab results document)")
    verified = verify(path)
    if not verified:
        warnings.warn(unverified_note(path) or "", UnverifiedResultsWarning, stacklevel=2)
    summary = pd.DataFrame.from_records(document["summary"])
    if len(summary):
        summary["eps"] = summary["eps"].astype("float64")
        # files written before certificates (robustlab.certify) have no certified_accuracy: NaN
        summary["certified_accuracy"] = summary.get("certified_accuracy", pd.Series(np.nan, index=summary.index)) \
            .astype("float64")
    frame = pd.read_csv(samples, dtype={k: v for k, v in _SAMPLE_DTYPES.items() if v != "bool"}) \
        if samples.exists() else pd.DataFrame(columns=SAMPLE_COLUMNS)
    for column, dtype in _SAMPLE_DTYPES.items():
        if dtype == "bool" and column in frame:
            frame[column] = frame[column].astype(bool)
    examples: dict[str, np.ndarray] = {}
    if (path / "examples.npz").exists():
        try:
            with np.load(path / "examples.npz", allow_pickle=False) as arrays:
                examples = {key: arrays[key] for key in arrays.files}
        except (ValueError, OSError, zipfile.BadZipFile) as error:  # object arrays need unpickling: refused
            raise InputError("results", f"cannot read {path / 'examples.npz'}: {error}") from None
    metadata = document.get("metadata", {})
    if document["schema"] != SCHEMA:
        from robustlab.verdicts import upgrade_metadata

        metadata = upgrade_metadata(metadata, summary)
    tables = {}
    for name in metadata.get("tables", []) or []:
        _check_table_name(name)
        if (path / f"{name}.csv").exists():
            tables[name] = pd.read_csv(path / f"{name}.csv")
    return AuditResult(summary=summary, samples=frame, metadata=metadata, examples=examples, tables=tables,
                       verified=verified)


def _check_table_name(name: str) -> None:
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum() or name == "samples":
        raise InputError("tables", f"table names are letters, digits, '_' and '-'; got {name!r}")


def example_key(model: str, attack: str, eps: float | None, targeted: str) -> str:
    """Key of one attack's adversarial examples in examples.npz.

    examples.npz holds, per model, `sample|MODEL` (sample ids) and `clean|MODEL` (their clean inputs),
    and per (model, attack, eps, targeted mode) `adv|MODEL|ATTACK|EPS|MODE` (the adversarial inputs of
    the same samples, first target; EPS is `none` for an unbounded run). Predictions and confidences
    for them are in samples.csv.
    """
    return f"adv|{model}|{attack}|{'none' if eps is None else repr(float(eps))}|{targeted}"


def sample_frame(rows: dict[str, list]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
    return frame.astype(_SAMPLE_DTYPES)


# ---------------------------------------------------------------------------- formatting
def format_table(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "(no results)"
    lines = []
    for (model, targeted), block in summary.groupby(["model", "targeted"], sort=False):
        clean = float(block["clean_accuracy"].iloc[0])
        mode = "untargeted" if targeted == "none" else f"targeted: {targeted}"
        norm = ", ".join(dict.fromkeys(block.loc[block["eps"].notna(), "norm"])) or "-"
        lines.append(f"{model}  ({norm}, {mode}; clean accuracy {clean:.1%}, n={int(block['n'].iloc[0])})")
        bounded = block[block["eps"].notna()]
        eps_values = sorted(bounded["eps"].unique())
        attacks = list(dict.fromkeys(bounded["attack"]))
        certified = [a for a in attacks if is_certified(a)]
        attacks = [a for a in attacks if a != WORST_CASE and not is_certified(a)] + \
            ([WORST_CASE] if WORST_CASE in attacks else []) + certified
        width = max([16] + [len(a) + 1 for a in attacks])
        labels = ["eps=" + eps_text(e) for e in eps_values]
        cell = max([11] + [len(label) + 2 for label in labels])  # columns never run together
        header = f"  {'robust accuracy':<{width}}" + "".join(f"{label:>{cell}}" for label in labels)
        lines.append(header)
        for attack in attacks:
            column = "certified_accuracy" if is_certified(attack) else "robust_accuracy"
            cells = []
            for e in eps_values:
                hit = bounded[(bounded["attack"] == attack) & (bounded["eps"] == e)]
                value = float(hit[column].iloc[0]) if len(hit) and column in hit else float("nan")
                cells.append(f"{value:>{cell}.1%}" if math.isfinite(value) else f"{'-':>{cell}}")
            lines.append(f"  {attack:<{width}}" + "".join(cells))
        if certified:
            lines.append(f"  ({', '.join(certified)}: certified accuracy, a lower bound of the attacks' robust "
                         "accuracy; smoothing's is the smoothed classifier's)")
        for _, row in block[block["eps"].isna()].iterrows():
            lines.append(f"  {row['attack']} without a budget: success {row['success_rate']:.1%}, "
                         f"median L2 {row['median_l2']:.3g}, median Linf {row['median_linf']:.3g}")
        lines.append("")
    return "\n".join(lines).rstrip()


def eps_text(eps: float) -> str:
    """eps as people write it: 0.1 stays 0.1, 8/255 is shown as 8/255 (not 0.0313725)."""
    plain = format(eps, "g")
    if len(plain) <= 6:
        return plain
    for denominator in (255, 256, 100, 1000):
        k = round(eps * denominator)
        if k and abs(eps - k / denominator) <= 1e-9 * max(1.0, abs(eps)):
            return f"{k}/{denominator}"
    return plain


def _extra(frame: pd.DataFrame, known: list[str]) -> list[str]:
    return [c for c in frame.columns if c not in known]


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: _py(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def _py(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _py(obj)
