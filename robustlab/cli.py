"""The `robustlab` command: parse, call the harness, print, exit.

Exit status: 0 every requirement met (or none set), 1 a requirement not met or that cannot be judged
(its evaluation is not established), 2 bad usage or bad input, requirements included (nothing is
written then). `report` and `compare` read saved results only and never import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:  # for annotations only: the CLI imports torch (through these) only where a command needs it
    from robustlab.data import Dataset
    from robustlab.defenses.recipes import Recipe

EXIT_OK, EXIT_THRESHOLD, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
_SAVED: list[str] = []  # results directories this command has swapped in (what an interrupt leaves)
_JOURNALS: list[Path] = []  # the journal of the audit under way (robustlab.journal): what a resume continues


class UsageError(Exception):
    """A command-line value that cannot be parsed; exit status 2."""


ATTACKS_PLACEHOLDER = "<registered attacks>"


class _HelpFormatter(argparse.HelpFormatter):
    """Fills the --attack help from the attack registry, only when help is printed (the registry
    imports torch; `report` and `compare` must start without it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text and ATTACKS_PLACEHOLDER in text:
            from robustlab.attacks import registry

            text = text.replace(ATTACKS_PLACEHOLDER, registry.help_text().replace("%", "%%"))
        return text


# ---------------------------------------------------------------------------- value parsers
def parse_number(text: str, option: str | None = None) -> float:
    """'0.1', '8/255' -> float; a UsageError naming `option` (e.g. '--eps') otherwise."""
    where = f"{option}: " if option else ""
    text = text.strip()
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except ZeroDivisionError:
        raise UsageError(f"{where}{text!r} divides by zero") from None
    except ValueError:
        raise UsageError(f"{where}not a number: {text!r} (fractions like 8/255 are allowed)") from None


def parse_numbers(text: str, option: str | None = None) -> list[float]:
    return [parse_number(part, option) for part in text.split(",") if part.strip()]


def parse_bounds(text: str) -> tuple[float, float]:
    values = parse_numbers(text, "--bounds")
    if len(values) != 2:
        raise UsageError(f"--bounds expects LO,HI, got {text!r}")
    return values[0], values[1]


def parse_names(text: str | None, option: str, what: str) -> list[str] | None:
    """Names given comma-separated or one per line in a file (--classes, --features)."""
    if text is None:
        return None
    if os.path.isfile(text):
        names = [line.strip() for line in Path(text).read_text().splitlines() if line.strip()]
    else:
        names = [part.strip() for part in text.split(",")]
    if not names or any(not n for n in names):
        raise UsageError(f"{option}: empty {what} name in {text!r}")
    return names


def parse_classes(text: str | None) -> list[str] | None:
    return parse_names(text, "--classes", "class")


def parse_features(text: str | None) -> list[str] | None:
    """--features: names of tabular inputs' features."""
    return parse_names(text, "--features", "feature")


def parse_image_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """--image-size H[,W], checked before any work; only with an image folder as --data."""
    text = getattr(args, "image_size", None)
    if text is None:
        return None
    from robustlab.errors import InputError
    from robustlab.image_folder import parse_image_size as parse

    try:
        size = parse(text)
    except InputError as error:
        raise UsageError(f"--image-size: {error.problem}") from None
    if not os.path.isdir(args.data):
        raise UsageError(f"--image-size: resizes the images of an image folder (--data DIR/); {args.data!r} is not "
                         "a folder")
    return size


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustlab", description="Adversarial robustness audits for PyTorch classifiers.",
        epilog="Exit status: 0 ok, 1 a requirement (--require, --fail-under, [tool.robustlab]) was not met or "
               "cannot be judged, 2 bad usage or input.")
    from robustlab import __version__

    parser.add_argument("--version", action="version", version=f"robustlab {__version__}")
    _logging_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    audit = sub.add_parser("audit", help="audit your own model", formatter_class=_HelpFormatter, description=(
        "Attack a trained classifier with FGSM, PGD and Carlini-Wagner, verify every result, and write "
        "results.json and samples.csv to --out."),
        epilog="Model SPEC: a TorchScript file, a torch.export program (.pt2), an ONNX file (.onnx: white-box "
               "through onnx2torch when the graph converts, else black-box through onnxruntime, where only "
               "Square runs; pip install 'robustlab[onnx]'), or package.module:factory "
               "(or file.py:factory) with --weights (.safetensors, or a state_dict file read with "
               "weights_only=True). Data SPEC: 'digits', an .npz with arrays x "
               "and y, an image folder DIR/ with one subfolder per class (PNG/JPEG; class names from the folder "
               "names, sorted, unless --classes; 1 channel when every image is grayscale, else RGB; --n reads "
               "only the first N images, taken in turn from each class), or package.module:function returning arrays, a Dataset or a DataLoader.")
    audit.add_argument("--model", required=True, metavar="SPEC", help="model to audit (see below)")
    audit.add_argument("--weights", metavar="FILE", help="weights for a module:factory model")
    audit.add_argument("--trust-pickle", action="store_true",
                       help="allow files that need arbitrary unpickling (only for files you trust)")
    audit.add_argument("--random-init", action="store_true",
                       help="allow a module:factory without --weights whose parameters are a random initialisation "
                            "(audits an untrained model on purpose)")
    audit.add_argument("--data", default="digits", metavar="SPEC",
                       help="evaluation data: digits (default), breast-cancer (tabular), an .npz, or module:function")
    audit.add_argument("--image-size", metavar="H[,W]",
                       help="resize an image folder's images to H x W (H alone: square); without it they must all "
                            "have one size")
    audit.add_argument("--out", required=True, metavar="DIR", help="results directory")
    audit.add_argument("--name", help="model name in results (default: the file's stem)")
    audit.add_argument("--classes", metavar="NAMES|FILE", help="class names, comma-separated or one per line in a file")
    audit.add_argument("--features", metavar="NAMES|FILE",
                       help="feature names of 1-D (tabular) inputs, comma-separated or one per line in a file; "
                            "shown in the report's SHAP, saliency and examples (default: the data's own, e.g. "
                            "breast-cancer's, else x[0], x[1], ...)")
    audit.add_argument("--bounds", default="0,1", metavar="LO,HI", help="input domain (default 0,1)")
    audit.add_argument("--mean", metavar="M[,M...]", help="normalisation mean, applied inside the model wrapper")
    audit.add_argument("--std", metavar="S[,S...]", help="normalisation std, applied inside the model wrapper")
    audit.add_argument("--output", default="auto", choices=("auto", "logits", "log_probs", "probs"),
                       help="what the model returns (default: detect; probabilities are refused unless 'probs')")
    _attack_options(audit)
    _requirement_options(audit)
    _tracking_options(audit)
    _defense_options(audit, default=None)
    _resume_options(audit)

    demo = sub.add_parser("demo", help="train a small CNN on digits and audit it", formatter_class=_HelpFormatter,
                          description="Train (once, then cached) a small CNN on scikit-learn's digits and audit it "
                                      "with FGSM, PGD and CW at Linf eps 0.05, 0.1, 0.2.")
    demo.add_argument("--out", default="robustlab-demo", metavar="DIR", help="results directory (default ./robustlab-demo)")
    demo.add_argument("--n", type=int, default=None, help="number of test samples (default: all 450)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--retrain", action="store_true", help="retrain the demo model instead of using the cache")
    _suite_option(demo)
    _certify_option(demo)
    _integrity_options(demo, explain_default="all")
    _requirement_options(demo)
    _tracking_options(demo)
    _defense_options(demo, default=DEMO_DEFENSES)

    report = sub.add_parser("report", help="render the HTML report of a results directory",
                            description="Render DIR/report.html (one self-contained file) and DIR/summary.md from "
                                        "saved results alone: no model, no re-run.")
    report.add_argument("dir", metavar="DIR", help="results directory (holds results.json)")
    report.add_argument("-o", "--out", metavar="FILE", help="where to write the HTML (default DIR/report.html)")
    for command in (audit, demo, report):
        _logging_options(command, top=False)

    compare = sub.add_parser("compare", help="compare two results directories",
                             description="What got better or worse from run A to run B, by how much, per model, "
                                         "attack and eps. HTML, or markdown when FILE ends in .md.")
    compare.add_argument("dir_a", metavar="DIR_A", help="baseline results directory")
    compare.add_argument("dir_b", metavar="DIR_B", help="results directory to compare with the baseline")
    compare.add_argument("-o", "--out", required=True, metavar="FILE", help="output file (.html or .md)")
    _logging_options(compare, top=False)
    return parser


def _resume_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("interruptions and scale", description=(
        "Every finished attack call is kept in a journal beside --out (.OUT.robustlab-journal), removed once the "
        "results are saved: after a kill or Ctrl-C, the same command resumes where it stopped, with the same "
        "result. Sharded over processes or machines: torchrun --nproc_per_node N -m robustlab audit ... "
        "(gloo on CPU, nccl on GPU, rank 0 writes; the result equals one process's)."))
    choice = g.add_mutually_exclusive_group()
    choice.add_argument("--resume", action="store_true",
                        help="continue an interrupted audit (rerunning the same command does this too); an error if "
                             "there is none to continue")
    choice.add_argument("--fresh", action="store_true",
                        help="discard an interrupted audit's journal and start over")


def _logging_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """-v/-q, accepted before and after the command (after it, they must not reset a value given before)."""
    g = p.add_argument_group("messages")
    keep = {} if top else {"default": argparse.SUPPRESS}
    g.add_argument("-v", "--verbose", action="count", help="also debug messages", **({"default": 0} if top else keep))
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (no status lines, no "
                                                              "progress bars)", **({"default": False} if top else keep))


def _logging(args: argparse.Namespace) -> Callable[[], None]:
    """Install the stderr handler at the level -v/-q ask for; checks ROBUSTLAB_PROGRESS. Returns the undo."""
    from robustlab import log, progress
    from robustlab.errors import InputError

    if args.quiet and args.verbose:
        raise UsageError("-q/--quiet and -v/--verbose exclude each other")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and os.environ.get("RANK", "0") != "0":
        # torchrun's other ranks: rank 0 speaks (read from the environment: `report` runs without torch)
        args.quiet, args.verbose = True, 0
    try:
        progress.environment_setting()
    except InputError as error:
        raise UsageError(str(error)) from None
    return log.install(log.level_for(args.verbose, args.quiet))


DEMO_DEFENSES = "pgd-at,distillation,ensemble"


def _tracking_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment tracking")
    g.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                   help="log the audit as one MLflow run (params, metrics, verdict tags, report and results as "
                        "artifacts) to URI, or without URI to MLflow's configured tracking URI "
                        "(MLFLOW_TRACKING_URI); needs pip install 'robustlab[mlflow]'")
    g.add_argument("--mlflow-experiment", default="robustlab", metavar="NAME",
                   help="MLflow experiment of the run (default: robustlab)")


def _check_tracking(args: argparse.Namespace) -> None:
    """Before any work: --mlflow needs mlflow importable."""
    if getattr(args, "mlflow", None) is not None:
        from robustlab.integrations.mlflow import require_mlflow

        require_mlflow()


def _track(args: argparse.Namespace, out: str) -> None:
    if getattr(args, "mlflow", None) is None:
        return
    from robustlab.integrations.mlflow import log_result

    run_id = log_result(out, tracking_uri=args.mlflow or None, experiment=args.mlflow_experiment)
    print(f"mlflow: run {run_id} in experiment {args.mlflow_experiment!r}")


def _requirement_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("requirements", "what decides the exit status. Without one the audit measures and "
                                              "says how far the figures can be trusted, never that a model is "
                                              "robust. robust_accuracy reads the worst case over every attack; a "
                                              "figure whose evaluation is not established (a check failed) cannot "
                                              "be judged, whatever the requirement")
    g.add_argument("--require", action="append", default=[], metavar="METRIC>=VALUE[@EPS]",
                   help="exit 1 unless METRIC >= VALUE (robust_accuracy, clean_accuracy, median_l2, median_linf); "
                        "at eps EPS only, or at every eps; repeatable, e.g. robust_accuracy>=0.6@8/255")
    g.add_argument("--fail-under", action="append", default=[], metavar="METRIC=VALUE[@EPS]",
                   help="the same as --require METRIC>=VALUE[@EPS], e.g. robust_accuracy=0.4@0.1")
    g.add_argument("--requirements", metavar="FILE|none",
                   help="read `require = [...]` from a robustlab.toml (top level) or a pyproject.toml "
                        "([tool.robustlab]); default: ./robustlab.toml, else ./pyproject.toml's [tool.robustlab], "
                        "when there is no --require or --fail-under; none: ignore them")


def _defense_options(p: argparse.ArgumentParser, *, default: str | None) -> None:
    g = p.add_argument_group("defenses", "train defended copies of the model and audit them side by side; each is "
                                          "saved under OUT/models/ (safetensors + JSON of how it was made)")
    g.add_argument("--defend", default=default, metavar="LIST",
                   help="comma-separated: pgd-at, fast-at, trades, distillation, ensemble (averaged logits and a "
                        "majority vote audited by transfer), all, or none"
                        + (f" (default: {default})" if default else ""))
    g.add_argument("--train-data", default="digits:train", metavar="SPEC",
                   help="training data for the defenses (default: digits:train, the split the audit does not use)")
    g.add_argument("--defend-eps", metavar="EPS", help="adversarial-training budget (default: the largest --eps)")
    g.add_argument("--defend-epochs", type=int, default=30, help="training epochs of each defense (default 30)")
    g.add_argument("--temperature", default="20", help="defensive-distillation temperature (default 20)")
    g.add_argument("--ensemble-size", type=int, default=3, help="members of the ensemble, the model included (default 3)")


def _attack_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attacks")
    g.add_argument("--attack", default="fgsm,pgd,cw",
                   help="comma-separated, reported beside the --suite: " + ATTACKS_PLACEHOLDER + ", or foolbox:NAME")
    _suite_option(g)
    _certify_option(g)
    g.add_argument("--eps", default="0.05,0.1,0.2", help="comma-separated budgets; fractions allowed (8/255)")
    g.add_argument("--norm", default="linf", choices=("linf", "l2"))
    g.add_argument("--targeted", default="none", help="none, random, least-likely, next, all, or a class label")
    g.add_argument("--steps", type=int, help="iterations of PGD (default 20) and of CW per search step (default 100)")
    g.add_argument("--restarts", type=int, help="PGD random restarts (default 1)")
    g.add_argument("--loss", choices=("ce", "margin"), help="PGD/FGSM loss (default ce)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n", "--samples", dest="n", type=int, metavar="N",
                   help="use the first N samples (--samples under torchrun, whose own options take --n)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--batch-size", type=int, help="default: chosen automatically, halved on out-of-memory")
    g.add_argument("--amp", action="store_true", help="mixed precision (float16 autocast) on a CUDA device")
    _integrity_options(p, explain_default=None)


def _suite_option(g: Any) -> None:
    g.add_argument("--suite", default="standard", choices=("standard", "quick", "none"),
                   help="attack cascade run on every sample beside --attack; its row joins the worst case "
                        "(default: standard = APGD-CE, APGD-T, Square-5000 as in AutoAttack; quick = APGD-CE and "
                        "APGD-T with fewer iterations, for CI; only the standard suite can establish robustness)")


def _certify_option(g: Any) -> None:
    g.add_argument("--certify", default=None, metavar="METHOD",
                   help="certified lower bounds beside the attacks, untargeted, at every eps: ibp, crown (proofs for "
                        "Linear/Conv/ReLU/pooling models; others are skipped with the reason), smoothing[:SIGMA] "
                        "(randomised smoothing of the model, default sigma 0.25); rows certified:METHOD with "
                        "certified_accuracy, also on the worst-case row")


def _certify(args: argparse.Namespace) -> str | None:
    """--certify, checked before any work (exit 2 naming --certify)."""
    from robustlab.errors import InputError
    from robustlab.harness import certify_spec, parse_certify

    try:
        return certify_spec(parse_certify(args.certify))
    except InputError as error:
        raise UsageError(f"--certify: {error.problem}") from None


def _integrity_options(p: argparse.ArgumentParser, *, explain_default: str | None) -> None:
    g = p.add_argument_group("integrity and explanations")
    g.add_argument("--checks", default="default", choices=("none", "default", "strict"),
                   help="integrity checks for gradient masking and weak attacks, each with a verdict (default: "
                        "default, the cheap ones; strict: also the costly ones; none: off)")
    g.add_argument("--explain", default=explain_default, metavar="LIST",
                   help="saliency, shap, probes (comma-separated), all, or none: explanations on clean and "
                        "adversarial inputs" + (f" (default: {explain_default})" if explain_default else ""))


# ---------------------------------------------------------------------------- commands
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    restore: Callable[[], None] = lambda: None
    _SAVED.clear()
    _JOURNALS.clear()
    try:
        restore = _logging(args)
        from robustlab import heap

        heap.bound()  # freed batch buffers go back to the system: memory does not grow with the audit's length
        if args.command == "demo":
            return _demo(args)
        if args.command == "report":
            return _report(args)
        if args.command == "compare":
            return _compare(args)
        return _audit(args)
    except UsageError as error:
        parser.exit(EXIT_USAGE, f"robustlab {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        print(f"robustlab {args.command}: {_interrupted(args)}", file=sys.stderr)
        if _JOURNALS:  # nothing finished: nothing to resume, nothing left behind
            from robustlab import journal

            journal.discard(_JOURNALS[-1], unless_finished=True)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - InputError is the expected one; see below
        from robustlab.errors import InputError

        if isinstance(error, InputError):
            print(f"robustlab {args.command}: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        raise
    finally:
        restore()
        if "robustlab.distributed" in sys.modules:  # an audit joined a process group: leave it
            sys.modules["robustlab.distributed"].stop()
    return EXIT_OK


def _interrupted(args: argparse.Namespace) -> str:
    """The one line a Ctrl-C prints: what it left. Saves are all or nothing (robustlab.results), so
    an output is either untouched or complete."""
    if args.command in ("audit", "demo"):
        if _SAVED:
            return f"interrupted after the results were saved to {_SAVED[-1]} (complete)"
        before = "still holds the previous results" if Path(args.out, "results.json").is_file() else \
            "was not written"
        units = 0
        if _JOURNALS:  # an audit began, so robustlab.journal (and torch) are imported already
            from robustlab.journal import finished_units

            units = finished_units(_JOURNALS[-1])
        if units:
            return (f"interrupted; nothing was saved ({args.out} {before}); {units} finished attack calls are kept "
                    f"in {_JOURNALS[-1]}: run the same command again to resume")
        return f"interrupted; nothing was saved ({args.out} {before}); run the command again to redo the audit"
    return "interrupted; nothing was written" if args.command == "compare" else \
        f"interrupted; {args.dir} holds the results as before"


def _requirements(args: argparse.Namespace, eps: Sequence[float]) -> list:
    """The run's requirements (robustlab.verdicts.Requirement), checked before any work: the command line's
    (--require, --fail-under) and --requirements FILE; without any, ./robustlab.toml or ./pyproject.toml's
    [tool.robustlab]. A requirement at an eps the run does not audit is a usage error."""
    from robustlab.errors import InputError
    from robustlab.gates import find_requirements_file, parse_requirement, requirements_file

    given = [parse_requirement(t, argument="--require") for t in args.require]
    given += [parse_requirement(t, argument="--fail-under") for t in args.fail_under]
    choice = args.requirements
    if choice is not None and choice.strip().lower() == "none":
        path = None
    elif choice is not None:
        path = Path(choice)
    else:
        path = None if given else find_requirements_file(".")
    if path is not None:
        given += requirements_file(path)
    for req in given:
        if req.eps is not None and not any(abs(req.eps - e) <= 1e-9 * max(1.0, e) for e in eps):
            argument = req.source if req.source.startswith("--") else f"{req.source} require"
            raise InputError(argument, f"{req.describe()}: eps {req.eps:g} is not audited (the audit's eps: "
                                       f"{', '.join(format(e, 'g') for e in eps)})")
    return given


def _audit(args: argparse.Namespace) -> int:
    eps = parse_numbers(args.eps, "--eps")
    requirements = _requirements(args, eps)
    _check_tracking(args)
    bounds = parse_bounds(args.bounds)
    mean = parse_numbers(args.mean, "--mean") if args.mean else None
    std = parse_numbers(args.std, "--std") if args.std else None
    classes = parse_classes(args.classes)
    image_size = parse_image_size(args)
    features = parse_features(args.features)
    attacks = [a.strip() for a in args.attack.split(",") if a.strip()]
    for option in ("steps", "restarts", "n", "batch_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be positive, got {value}")
    certify = _certify(args)
    from robustlab.gates import check_certify

    check_certify(certify=certify, requirements=requirements)  # certified_accuracy>=... needs --certify

    from robustlab.harness import audit, check_audit, check_model_name, resolve_device
    from robustlab.loading import load_model
    from robustlab.results import check_output_dir

    if args.name is not None:
        check_model_name(args.name, "name")
    from robustlab import distributed, journal

    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 alone writes --out (other nodes need not see it)
        check_output_dir(args.out)

    device = resolve_device(distributed.local_device(args.device))
    if distributed.launched() and args.defend:
        raise UsageError("--defend under torchrun: train the defenses in one process (they are saved under "
                         "OUT/models), then audit the saved models sharded")
    distributed.start(device)
    journal_at = journal.journal_dir(args.out)
    if args.fresh:
        journal.discard(journal_at)
    model = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle, device=device,
                       random_init=args.random_init, bounds=bounds, mean=mean, std=std, name=args.name,
                       classes=classes, output=args.output, amp=args.amp)
    from robustlab.data import load_data

    data = load_data(args.data, trust_pickle=args.trust_pickle, n=args.n, image_size=image_size)  # reads n only
    if classes is None and os.path.isdir(args.data) and data.classes:
        model.classes = list(data.classes)  # an image folder's class names: its subfolders' (checked at inspection)
    options = dict(attacks=attacks, eps=eps, norm=args.norm, targeted=args.targeted, steps=args.steps,
                   restarts=args.restarts, loss=args.loss, seed=args.seed, n=args.n, device=device,
                   batch_size=args.batch_size, checks=args.checks, explain=args.explain, suite=args.suite,
                   certify=certify, features=features)
    defense_plan = _defense_plan(args, eps)
    if defense_plan is not None and getattr(model.module, "black_box", False):
        raise UsageError(f"--defend: {args.model} is audited black-box (no parameters or gradients to train); "
                         "defenses need a model robustlab can train (an ONNX graph onnx2torch converts, or the "
                         "PyTorch model itself)")
    if defense_plan is not None:
        check_audit(model, data, **options)  # every audit option checked before hours of training
        _check_defense_inputs(model, defense_plan)
    models, defended = _with_defenses(model, defense_plan, args)
    _JOURNALS.append(journal_at)
    result = audit(models, data, **options, journal=journal.Request(
        journal_at, argument="--resume" if args.resume else "--out", must_exist=args.resume))
    code = _finish(result, args.out, requirements, defended=defended, base=model, base_spec=args.model,
                   track=lambda: _track(args, args.out))
    journal.discard(journal_at)  # the results it led to are saved
    return code


def _demo(args: argparse.Namespace) -> int:
    from robustlab.harness import audit, resolve_device
    from robustlab.data import digits_split
    from robustlab.demo import digits_cnn
    from robustlab.model import ModelUnderTest
    from robustlab.results import check_output_dir

    eps = (0.05, 0.1, 0.2)
    requirements = _requirements(args, eps)
    _check_tracking(args)
    certify = _certify(args)
    from robustlab.gates import check_certify

    check_certify(certify=certify, requirements=requirements)  # certified_accuracy>=... needs --certify
    check_output_dir(args.out)
    device = resolve_device(args.device)
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n must be positive, got {args.n}")
    from robustlab.explaining import parse_stages

    parse_stages(args.explain)
    module, path = digits_cnn(retrain=args.retrain)
    _log().info(f"demo model: {path}")
    from robustlab.model import file_sha256

    model = ModelUnderTest(module.to(device), name="digits-cnn", bounds=(0.0, 1.0), sha256=file_sha256(str(path)),
                           source=f"robustlab demo ({path.name})", classes=[str(i) for i in range(10)], device=device)
    defense_plan = _defense_plan(args, list(eps))
    if defense_plan is not None:
        _check_defense_inputs(model, defense_plan)
    models, defended = _with_defenses(model, defense_plan, args)
    result = audit(models, digits_split("test"), attacks=("fgsm", "pgd", "cw"), eps=eps, seed=args.seed,
                   n=args.n, device=device, checks=args.checks, explain=args.explain,
                   suite=args.suite, certify=certify)
    return _finish(result, args.out, requirements, defended=defended, base=model,
                   base_spec="robustlab.zoo:digits_cnn", track=lambda: _track(args, args.out))


@dataclass(frozen=True)
class _DefensePlan:
    names: list[str]
    recipe: Recipe
    train_data: Dataset


def _defense_plan(args: argparse.Namespace, eps: list[float]) -> _DefensePlan | None:
    """Parse and check the defense options before anything is trained or attacked."""
    if not args.defend or args.defend.strip().lower() == "none":
        return None
    from robustlab.data import load_data
    from robustlab.defenses.recipes import Recipe, parse_defenses

    names = parse_defenses(args.defend)
    for option in ("defend_epochs", "ensemble_size"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    temperature = parse_number(args.temperature, "--temperature")
    defend_eps = parse_number(args.defend_eps, "--defend-eps") if args.defend_eps else max(eps)
    if not math.isfinite(defend_eps) or defend_eps < 0:
        raise UsageError(f"--defend-eps: must be a finite number >= 0, got {args.defend_eps}")
    recipe = Recipe(eps=defend_eps, norm=getattr(args, "norm", "linf"), epochs=args.defend_epochs,
                    temperature=temperature, members=args.ensemble_size, seed=args.seed)
    from robustlab.errors import InputError

    try:
        size = getattr(args, "image_size", None)
        train = load_data(args.train_data, trust_pickle=getattr(args, "trust_pickle", False),
                          image_size=parse_image_size(args) if size and os.path.isdir(args.train_data) else None)
    except InputError as error:
        raise InputError("train-data", error.problem) from None
    return _DefensePlan(names=names, recipe=recipe, train_data=train)


def _check_defense_inputs(model, plan: _DefensePlan) -> None:
    """Before training: the training inputs (finite, inside the bounds; indices as in the file) and the
    training budget (it fits the input box), named as the options that set them."""
    from robustlab.attacks.base import check_eps_fits, validate_inputs
    from robustlab.errors import InputError
    from robustlab.threat import get_norm

    try:
        x = validate_inputs(model, plan.train_data.x)
    except InputError as error:
        raise InputError("train-data", f"inputs ({error.argument}) {error.problem}") from None
    try:
        check_eps_fits(plan.recipe.eps, get_norm(plan.recipe.norm), model, tuple(x.shape[1:]))
    except InputError as error:
        raise InputError("--defend-eps", error.problem) from None


def _with_defenses(model, plan: _DefensePlan | None, args: argparse.Namespace):
    """{name: model} with the defended copies trained (or resumed from the cache); and the defended modules."""
    if plan is None:
        return model, {}
    from robustlab.defenses.recipes import build_defenses, defended_wrapper
    from robustlab.demo import cache_dir

    defended = build_defenses(model, plan.names, plan.train_data, plan.recipe, work_dir=cache_dir() / "defenses",
                              progress=_log().info)
    models = {model.name: model}
    for name, module in defended.items():
        if name in models:
            raise UsageError(f"the model is named {name!r}, like a defense; choose another --name")
        models[name] = defended_wrapper(module, model, name)
    return models, defended


def _finish(result, out: str, requirements: list, *, defended: dict | None = None, base=None,
            base_spec: str | None = None, track: Callable[[], None] | None = None) -> int:
    from robustlab import gates, verdicts
    from robustlab.integrity import format_checks

    judged = gates.judge_requirements(result, requirements)
    failed = EXIT_THRESHOLD if any(not j["passed"] for j in judged) else EXIT_OK
    from robustlab import distributed

    if not distributed.is_main():  # a torchrun rank other than 0: same numbers, same exit status, rank 0 writes
        return failed
    if judged:
        gates.record_requirements(result, judged)
    if defended:
        result.metadata["defended_models"] = {name: f"models/{name}.safetensors" for name in defended}

    def complete(new: Path) -> None:
        """The defended models and the report go into the new directory before it is swapped in."""
        if defended:
            from robustlab.defenses.recipes import save_models

            save_models(defended, new / "models", base=base, base_spec=base_spec, named=Path(out) / "models")
        _render(str(new), named=out)  # from the saved files alone, as `robustlab report` would

    result.save(out, also=complete)
    _SAVED.append(out)
    report, summary = Path(out) / "report.html", Path(out) / "summary.md"
    print(result.table())
    for name, info in (result.metadata.get("certify") or {}).items():
        if isinstance(info, dict) and info.get("status") == "skipped":
            print(f"certify {info.get('method')}: {name} skipped: {info.get('reason')}")
    print("\n" + format_checks(result))
    print(f"\nresults: {os.path.join(out, 'results.json')} and samples.csv; report: {report}; summary: {summary}")
    print("\n" + verdicts.format_verdicts(verdicts.records(result.metadata, result.summary), judged))
    for j in judged:
        print(_judgement_line(j))
    if track is not None:
        track()
    return failed


def _judgement_line(j: dict) -> str:
    """'pass  robust_accuracy >= 0.5 at eps=0.1: m worst-case eps=0.1 (untargeted): 50.9% [46.3%, 55.5%] n=450;
    established; meets': the figure, its evaluation, the outcome."""
    from robustlab import verdicts

    head = f"{'pass' if j['passed'] else 'FAIL'}  {j['requirement']}"
    if j.get("model") is None:
        return f"{head}: {j.get('reason')}; {j['outcome']}"
    if j["metric"] == "clean_accuracy":
        where = str(j["model"])
    else:
        mode = "untargeted" if j.get("targeted") == "none" else f"targeted: {j.get('targeted')}"
        where = f"{j['model']} {j['attack']} eps={float(j['eps']):g} ({mode})"
    if j.get("interval"):
        figure = verdicts.figure_text({"robust_accuracy": j["observed"], "interval": j["interval"], "n": j["n"]})
    else:
        figure = "-" if j.get("observed") is None else f"{float(j['observed']):.4g}"
    # the evaluation says why a figure cannot be judged; "meets: certified" says the lower bound met it
    outcome = j["outcome"] if j.get("evaluation") and j.get("basis") != verdicts.CERTIFIED_BASIS \
        else verdicts.outcome_label(j)
    parts = [figure] + ([j["evaluation"]] if j.get("evaluation") else []) + [outcome]
    note = f" ({j['note']})" if j.get("note") else ""
    return f"{head}: {where}: {'; '.join(parts)}{note}"


def _render(directory: str, out: str | None = None, *, named: str | None = None) -> tuple:
    """report.html (or `out`) and summary.md of `directory`; `named`: where a new directory will be."""
    from robustlab.reports import render, write_summary

    report = render(directory, out)
    return report, write_summary(directory, named=named)


@contextlib.contextmanager
def _unverified(command: str, *directories: str) -> Iterator[None]:
    """Results saved without file digests load unverified: one line says so (instead of a warning per load)."""
    import warnings

    from robustlab.results import UnverifiedResultsWarning, unverified_note

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UnverifiedResultsWarning)
        yield  # the note only for results that could be read
    for directory in dict.fromkeys(directories):
        note = unverified_note(directory)
        if note:
            print(f"robustlab {command}: note: {note}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    with _unverified("report", args.dir):
        report, summary = _render(args.dir, args.out)
    print(f"report: {report}\nsummary: {summary}")
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    from robustlab.reports import compare

    with _unverified("compare", args.dir_a, args.dir_b):
        written = compare(args.dir_a, args.dir_b, args.out)
    print(f"comparison: {written}")
    return EXIT_OK


def _log():
    from robustlab.log import get_logger

    return get_logger("robustlab.cli")


def entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
