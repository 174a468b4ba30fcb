"""The `robustlab` command: parse, call the harness, print, exit.

Exit status: 0 all thresholds met, 1 a --fail-under threshold missed, 2 bad usage or bad input
(nothing is written then). `report` and `compare` read saved results only and never import torch.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_THRESHOLD, EXIT_USAGE = 0, 1, 2
THRESHOLD_METRICS = ("robust_accuracy", "clean_accuracy", "median_l2", "median_linf")


class UsageError(Exception):
    """A command-line value that cannot be parsed; exit status 2."""


# ---------------------------------------------------------------------------- value parsers
def parse_number(text: str) -> float:
    """'0.1', '8/255' -> float."""
    text = text.strip()
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"not a number: {text!r}") from None


def parse_numbers(text: str) -> list[float]:
    return [parse_number(part) for part in text.split(",") if part.strip()]


def parse_bounds(text: str) -> tuple[float, float]:
    values = parse_numbers(text)
    if len(values) != 2:
        raise UsageError(f"--bounds expects LO,HI, got {text!r}")
    return values[0], values[1]


def parse_classes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if os.path.isfile(text):
        names = [line.strip() for line in Path(text).read_text().splitlines() if line.strip()]
    else:
        names = [part.strip() for part in text.split(",")]
    if not names or any(not n for n in names):
        raise UsageError(f"--classes: empty class name in {text!r}")
    return names


@dataclass(frozen=True)
class Threshold:
    metric: str
    value: float
    eps: float | None

    def describe(self) -> str:
        where = f" at eps={self.eps:g}" if self.eps is not None else ""
        return f"{self.metric} >= {self.value:g}{where}"


def parse_threshold(text: str) -> Threshold:
    """'robust_accuracy=0.4' or 'robust_accuracy=0.4@0.1' (at eps 0.1 only)."""
    match = re.fullmatch(r"\s*([a-z_0-9]+)\s*=\s*([^@]+?)\s*(?:@\s*(.+))?", text)
    if not match:
        raise UsageError(f"--fail-under expects METRIC=VALUE[@EPS], got {text!r}")
    metric, value, eps = match.groups()
    if metric not in THRESHOLD_METRICS:
        raise UsageError(f"--fail-under: unknown metric {metric!r}; expected one of {', '.join(THRESHOLD_METRICS)}")
    return Threshold(metric, parse_number(value), None if eps is None else parse_number(eps))


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustlab", description="Adversarial robustness audits for PyTorch classifiers.",
        epilog="Exit status: 0 ok, 1 a --fail-under threshold was missed, 2 bad usage or input.")
    from robustlab import __version__

    parser.add_argument("--version", action="version", version=f"robustlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    audit = sub.add_parser("audit", help="audit your own model", description=(
        "Attack a trained classifier with FGSM, PGD and Carlini-Wagner, verify every result, and write "
        "results.json and samples.csv to --out."),
        epilog="Model SPEC: a TorchScript file, a torch.export program (.pt2), or package.module:factory "
               "(or file.py:factory) with --weights (.safetensors, or a state_dict file read with "
               "weights_only=True). ONNX is not supported yet. Data SPEC: 'digits', an .npz with arrays x "
               "and y, or package.module:function returning arrays, a Dataset or a DataLoader.")
    audit.add_argument("--model", required=True, metavar="SPEC", help="model to audit (see below)")
    audit.add_argument("--weights", metavar="FILE", help="weights for a module:factory model")
    audit.add_argument("--trust-pickle", action="store_true",
                       help="allow files that need arbitrary unpickling (only for files you trust)")
    audit.add_argument("--data", default="digits", metavar="SPEC", help="evaluation data (default: digits)")
    audit.add_argument("--out", required=True, metavar="DIR", help="results directory")
    audit.add_argument("--name", help="model name in results (default: the file's stem)")
    audit.add_argument("--classes", metavar="NAMES|FILE", help="class names, comma-separated or one per line in a file")
    audit.add_argument("--bounds", default="0,1", metavar="LO,HI", help="input domain (default 0,1)")
    audit.add_argument("--mean", metavar="M[,M...]", help="normalisation mean, applied inside the model wrapper")
    audit.add_argument("--std", metavar="S[,S...]", help="normalisation std, applied inside the model wrapper")
    audit.add_argument("--output", default="auto", choices=("auto", "logits", "log_probs", "probs"),
                       help="what the model returns (default: detect; probabilities are refused unless 'probs')")
    _attack_options(audit)
    audit.add_argument("--fail-under", action="append", default=[], metavar="METRIC=VALUE[@EPS]",
                       help="exit 1 if METRIC falls below VALUE (robust_accuracy uses the worst case over "
                            "attacks); repeatable, e.g. robust_accuracy=0.4@0.1")

    demo = sub.add_parser("demo", help="train a small CNN on digits and audit it",
                          description="Train (once, then cached) a small CNN on scikit-learn's digits and audit it "
                                      "with FGSM, PGD and CW at Linf eps 0.05, 0.1, 0.2.")
    demo.add_argument("--out", default="robustlab-demo", metavar="DIR", help="results directory (default ./robustlab-demo)")
    demo.add_argument("--n", type=int, default=None, help="number of test samples (default: all 450)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--retrain", action="store_true", help="retrain the demo model instead of using the cache")
    demo.add_argument("--quiet", action="store_true", help="no progress messages")

    report = sub.add_parser("report", help="render the HTML report of a results directory",
                            description="Render DIR/report.html (one self-contained file) and DIR/summary.md from "
                                        "saved results alone: no model, no re-run.")
    report.add_argument("dir", metavar="DIR", help="results directory (holds results.json)")
    report.add_argument("-o", "--out", metavar="FILE", help="where to write the HTML (default DIR/report.html)")

    compare = sub.add_parser("compare", help="compare two results directories",
                             description="What got better or worse from run A to run B, by how much, per model, "
                                         "attack and eps. HTML, or markdown when FILE ends in .md.")
    compare.add_argument("dir_a", metavar="DIR_A", help="baseline results directory")
    compare.add_argument("dir_b", metavar="DIR_B", help="results directory to compare with the baseline")
    compare.add_argument("-o", "--out", required=True, metavar="FILE", help="output file (.html or .md)")
    return parser


def _attack_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attacks")
    g.add_argument("--attack", default="fgsm,pgd,cw", help="comma-separated: fgsm, pgd, cw, foolbox:NAME")
    g.add_argument("--eps", default="0.05,0.1,0.2", help="comma-separated budgets; fractions allowed (8/255)")
    g.add_argument("--norm", default="linf", choices=("linf", "l2"))
    g.add_argument("--targeted", default="none", help="none, random, least-likely, next, all, or a class label")
    g.add_argument("--steps", type=int, help="iterations of PGD (default 20) and of CW per search step (default 100)")
    g.add_argument("--restarts", type=int, help="PGD random restarts (default 1)")
    g.add_argument("--loss", choices=("ce", "margin"), help="PGD/FGSM loss (default ce)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n", type=int, help="use the first N samples")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--batch-size", type=int, help="default: chosen automatically, halved on out-of-memory")
    g.add_argument("--amp", action="store_true", help="mixed precision (float16 autocast) on a CUDA device")
    g.add_argument("--quiet", action="store_true", help="no progress messages")


# ---------------------------------------------------------------------------- commands
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "report":
            return _report(args)
        if args.command == "compare":
            return _compare(args)
        return _audit(args)
    except UsageError as error:
        parser.exit(EXIT_USAGE, f"robustlab {args.command}: error: {error}\n")
    except Exception as error:  # noqa: BLE001 - InputError is the expected one; see below
        from robustlab.errors import InputError

        if isinstance(error, InputError):
            print(f"robustlab {args.command}: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        raise
    return EXIT_OK


def _audit(args: argparse.Namespace) -> int:
    thresholds = [parse_threshold(t) for t in args.fail_under]
    eps = parse_numbers(args.eps)
    bounds = parse_bounds(args.bounds)
    mean = parse_numbers(args.mean) if args.mean else None
    std = parse_numbers(args.std) if args.std else None
    classes = parse_classes(args.classes)
    attacks = [a.strip() for a in args.attack.split(",") if a.strip()]
    for option in ("steps", "restarts", "n", "batch_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be positive, got {value}")

    from robustlab.harness import audit, resolve_device
    from robustlab.loading import load_model
    from robustlab.results import check_output_dir

    check_output_dir(args.out)
    device = resolve_device(args.device)
    model = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle, device=device,
                       bounds=bounds, mean=mean, std=std, name=args.name, classes=classes, output=args.output,
                       amp=args.amp)
    from robustlab.data import load_data

    data = load_data(args.data, trust_pickle=args.trust_pickle)
    result = audit(model, data, attacks=attacks, eps=eps, norm=args.norm, targeted=args.targeted, steps=args.steps,
                   restarts=args.restarts, loss=args.loss, seed=args.seed, n=args.n, device=device,
                   batch_size=args.batch_size, progress=not args.quiet)
    return _finish(result, args.out, thresholds)


def _demo(args: argparse.Namespace) -> int:
    from robustlab.harness import audit, resolve_device
    from robustlab.data import digits_split
    from robustlab.demo import digits_cnn
    from robustlab.model import ModelUnderTest
    from robustlab.results import check_output_dir

    check_output_dir(args.out)
    device = resolve_device(args.device)
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n must be positive, got {args.n}")
    module, path = digits_cnn(retrain=args.retrain)
    if not args.quiet:
        print(f"[robustlab] demo model: {path}", file=sys.stderr)
    from robustlab.model import file_sha256

    model = ModelUnderTest(module.to(device), name="digits-cnn", bounds=(0.0, 1.0), sha256=file_sha256(str(path)),
                           source=f"robustlab demo ({path.name})", classes=[str(i) for i in range(10)], device=device)
    result = audit(model, digits_split("test"), attacks=("fgsm", "pgd", "cw"), eps=(0.05, 0.1, 0.2), seed=args.seed,
                   n=args.n, device=device, progress=not args.quiet)
    return _finish(result, args.out, [])


def _finish(result, out: str, thresholds: list[Threshold]) -> int:
    checks = _check_thresholds(result.summary, thresholds)
    if thresholds:
        result.metadata["thresholds"] = [{k: v for k, v in c.items() if k != "line"} for c in checks]
    result.save(out)
    print(result.table())
    report, summary = _render(out)  # from the saved files alone, as `robustlab report` would
    print(f"\nresults: {os.path.join(out, 'results.json')} and samples.csv; report: {report}; summary: {summary}")
    for c in checks:
        print(c["line"])
    return EXIT_THRESHOLD if any(not c["passed"] for c in checks) else EXIT_OK


def _render(directory: str, out: str | None = None) -> tuple:
    from robustlab.reports import render, write_summary

    report = render(directory, out)
    return report, write_summary(directory)


def _report(args: argparse.Namespace) -> int:
    report, summary = _render(args.dir, args.out)
    print(f"report: {report}\nsummary: {summary}")
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    from robustlab.reports import compare

    print(f"comparison: {compare(args.dir_a, args.dir_b, args.out)}")
    return EXIT_OK


def _check_thresholds(summary, thresholds: list[Threshold]) -> list[dict]:
    """One record per (threshold, checked summary row): what was required, what was seen, passed, and
    the line to print. Recorded in the results' metadata ("thresholds") for the report."""
    import math

    checks: list[dict] = []
    for t in thresholds:
        base = {"metric": t.metric, "value": t.value, "eps": t.eps, "description": t.describe()}
        rows = summary[summary["eps"].notna()]
        if t.metric == "robust_accuracy":
            worst = rows[rows["attack"] == "worst-case"]
            rows = worst if len(worst) else rows
        if t.eps is not None:
            rows = rows[(rows["eps"] - t.eps).abs() <= 1e-9]
        if rows.empty:
            checks.append(base | {"observed": None, "passed": False,
                                  "line": f"FAIL  {t.describe()}: no results to check (is eps {t.eps} among --eps?)"})
            continue
        for _, row in rows.iterrows():
            value = float(row[t.metric])
            ok = not math.isnan(value) and value >= t.value
            checks.append(base | {
                "model": str(row["model"]), "attack": str(row["attack"]), "eps": float(row["eps"]),
                "targeted": str(row["targeted"]), "observed": value, "passed": bool(ok),
                "line": f"{'pass' if ok else 'FAIL'}  {t.describe()}: {row['model']} {row['attack']} "
                        f"eps={row['eps']:g} targeted={row['targeted']}: {value:.4g}"})
    return checks


def entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
