"""The model under test: one function from inputs in a declared box to logits.

Every attack, explanation and check sees a `ModelUnderTest`, never the raw module, so that
- normalisation (mean/std) happens inside the wrapper and attacks work in the user's input space;
- the model runs in eval mode with its parameters frozen, and both are restored afterwards;
- outputs that are probabilities (which silently weaken gradient attacks) are detected and
  refused unless the user says so, and log-probabilities or a single binary logit are handled;
- randomness in the forward pass is detected and reported;
- device and dtype follow the model, and data is moved batch by batch.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from robustlab.errors import InputError
from robustlab.threat import Bounds

OUTPUT_KINDS = ("auto", "logits", "log_probs", "probs")
PROBE_SAMPLES = 64  # inputs of inspect()'s probe batch (shape, output kind, determinism)
BATCH_CHECK_SAMPLES = 8  # of them, evaluated one at a time against the probe batch


class NonFiniteOutputError(InputError):
    """The model returned NaN or infinite outputs on inputs inside the bounds: nothing is scored."""

    def __init__(self, problem: str) -> None:
        super().__init__("model", problem)


class RobustlabWarning(UserWarning):
    """Something in the audit deserves the user's attention but does not stop it."""


@dataclass
class ModelInspection:
    """What a probe forward pass taught us about the model; recorded in results metadata."""

    num_classes: int
    input_shape: tuple[int, ...]
    output_kind: str  # as detected: logits, log_probs, probs, binary_logit, binary_prob
    deterministic: bool
    max_repeat_difference: float
    notes: list[str] = field(default_factory=list)
    # outputs of single inputs vs the same inputs in a batch, relative to the largest output
    # (None: not measured, e.g. a random forward pass)
    max_batch_difference: float | None = None


def _as_bounds(bounds: Bounds | tuple | Sequence[float] | None) -> Bounds:
    if bounds is None:
        return Bounds(0.0, 1.0)
    if isinstance(bounds, Bounds):
        return bounds
    try:
        low, high = bounds
    except (TypeError, ValueError):
        raise InputError("bounds", f"expected (low, high), got {bounds!r}") from None
    return Bounds(low if isinstance(low, torch.Tensor) else float(low),
                  high if isinstance(high, torch.Tensor) else float(high))


def _as_stat(name: str, value: float | Sequence[float] | torch.Tensor | None) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if not torch.isfinite(t).all():
        raise InputError(name, f"must be finite, got {value!r}")
    if name == "std" and (t <= 0).any():
        raise InputError("std", f"must be positive, got {value!r}")
    return t


class ModelUnderTest:
    """Wraps a trained classifier for auditing. Call it on a batch in the input box to get logits.

    Args:
        module: an `nn.Module` (or TorchScript / exported module) in eval mode.
        bounds: the input box (low, high), scalars or per-feature tensors; default (0, 1).
        mean, std: normalisation applied inside the wrapper (per channel or per feature).
        name: shown in results and reports.
        classes: class names, one per output.
        output: "auto" (detect; refuse probabilities), "logits", "log_probs", or "probs"
            (attack log(probs); gradients vanish where the softmax saturates).
        device: where to run; default: where the module's parameters are.
    """

    _evaluating = 0  # depth of nested evaluating() blocks
    _guard_state: "_OutputGuard | None" = None

    def __init__(
        self,
        module: nn.Module | Callable[[torch.Tensor], torch.Tensor],
        *,
        bounds: Bounds | tuple | None = None,
        mean: float | Sequence[float] | torch.Tensor | None = None,
        std: float | Sequence[float] | torch.Tensor | None = None,
        name: str | None = None,
        classes: Sequence[str] | None = None,
        output: str = "auto",
        device: torch.device | str | None = None,
        sha256: str | None = None,
        source: str | None = None,
        amp: bool = False,
    ) -> None:
        if isinstance(module, ModelUnderTest):
            raise InputError("module", "is already a ModelUnderTest; pass it directly instead of wrapping it again")
        if _is_exported_program(module):
            from robustlab.layers import remember_program

            program: Any = module
            exported: nn.Module = program.module()
            remember_program(exported, program)
            module = exported
        if not callable(module):
            raise InputError("model", f"expected a torch.nn.Module or callable, got {type(module).__name__}")
        if output not in OUTPUT_KINDS:
            raise InputError("output", f"expected one of {', '.join(OUTPUT_KINDS)}, got {output!r}")
        if isinstance(module, nn.Module):
            training = [n or "<root>" for n, m in module.named_modules() if m.training]
            if training and not is_exported(module):
                raise InputError(
                    "model",
                    f"is in training mode ({', '.join(training[:3])}{'...' if len(training) > 3 else ''}): "
                    "dropout and batch-norm would make attacks random and update running statistics. "
                    "Call model.eval() first; robustlab keeps it in eval mode during the audit and "
                    "restores every flag afterwards.")
        self.module = module
        self.bounds = _as_bounds(bounds)
        self.mean = _as_stat("mean", mean)
        self.std = _as_stat("std", std)
        self.name = name or _default_name(module)
        self.classes = [str(c) for c in classes] if classes is not None else None
        self.output = output
        self.source = source
        self._sha256 = sha256
        self._device = torch.device(device) if device is not None else _module_device(module)
        self.dtype = _module_dtype(module)
        if device is not None and isinstance(module, nn.Module):
            module.to(self._device)
        if amp and self._device.type != "cuda":
            raise InputError("amp", f"mixed precision runs on a CUDA device; the model is on {self._device}")
        self.amp = amp
        self.inspection: ModelInspection | None = None
        self._output_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._stats_cache: dict = {}
        self.load_notes: list[str] = []  # how the model was loaded, shown with the inspection's notes

    def with_module(self, module: nn.Module, *, name: str | None = None,
                    keep_inspection: bool = True) -> "ModelUnderTest":
        """The same wrapper (bounds, normalisation, classes, output kind, device, dtype and, unless
        keep_inspection=False, the inspection) around another module computing the same function:
        a twin whose layers accept hooks (robustlab.layers.hookable), say."""
        other = ModelUnderTest(module, bounds=self.bounds, mean=self.mean, std=self.std, name=name or self.name,
                               classes=self.classes, output=self.output, device=self.device, sha256=self._sha256,
                               source=self.source, amp=self.amp)
        other.dtype = self.dtype
        if keep_inspection:
            other.inspection = self.inspection
            other._output_transform = self._output_transform
        return other

    # ------------------------------------------------------------------ basics
    @property
    def _guard(self) -> "_OutputGuard":
        if self._guard_state is None:
            self._guard_state = _OutputGuard()
        return self._guard_state

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_classes(self) -> int:
        if self.inspection is None:
            raise RuntimeError("call inspect(x) first: the class count comes from a probe forward pass")
        return self.inspection.num_classes

    def parameter_count(self) -> int:
        if isinstance(self.module, nn.Module):
            return sum(p.numel() for p in self.module.parameters())
        return 0

    def sha256(self) -> str:
        """The source file's hash when loaded from disk, else a hash of the state dict."""
        if self._sha256 is None:
            self._sha256 = state_dict_sha256(self.module) if isinstance(self.module, nn.Module) else "unknown"
        return self._sha256

    # ------------------------------------------------------------------ forward
    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None and self.std is None:
            return x
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._stats_cache:
            self._stats_cache[key] = tuple(
                None if s is None else _broadcast_stat(name, s, x) for name, s in (("mean", self.mean), ("std", self.std)))
        mean, std = self._stats_cache[key]
        if mean is not None:
            x = x - mean
        if std is not None:
            x = x / std
        return x

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs in the user's space -> what the module receives (mean/std applied)."""
        return self._normalise(x)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The module's own output on inputs in the user's space (normalisation applied).

        A module that squeezes its output (`.squeeze()`) returns shape (classes,) for a batch of
        one input; the batch dimension is put back, so a last batch of one is never misread."""
        if self.amp:
            with torch.autocast(device_type="cuda", dtype=torch.float16):
                out = self.module(self._normalise(x))
        else:
            out = self.module(self._normalise(x))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):
            for key in ("logits", "output", "out"):
                if key in out:
                    out = out[key]
                    break
        if not isinstance(out, torch.Tensor):
            raise InputError("model", f"forward must return a tensor of logits, got {type(out).__name__}")
        if out.dim() == 1 and x.dim() >= 1 and x.shape[0] == 1 and out.shape[0] != 1:
            out = out.unsqueeze(0)  # (classes,) from a batch of one: a squeezed batch dimension
        return out.float() if self.amp else out

    def move_to(self, device: torch.device) -> None:
        """Move the wrapped module (an explicit request; robustlab never moves models on its own)."""
        if isinstance(self.module, nn.Module):
            self.module.to(device)
        self._device = device
        self._stats_cache.clear()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (B, num_classes), for inputs in the declared box.

        Inside `evaluating()` every call's outputs are checked for NaN and infinity on the device,
        with no host sync; the block raises `NonFiniteOutputError` when it ends (see _OutputGuard).
        """
        out = self.raw(_fast_layout(x))
        if self._output_transform is not None:
            out = self._output_transform(out)
        if self._evaluating:
            self._guard.record(out)
        return out

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def require_finite(self, outputs: torch.Tensor, *, sample_ids: torch.Tensor | None = None,
                       what: str = "inputs") -> None:
        """Raise NonFiniteOutputError, naming the samples, if any of `outputs` is NaN or infinite.

        For a funnel that scores outputs (e.g. attack verification): `outputs` is (n, classes) or
        (draws, n, classes); `sample_ids` (n,) names the rows in the message. One reduction and one
        host sync, so call it where the outputs are about to be moved to the host anyway.
        """
        o = outputs.detach()
        if o.dim() == 1:
            o = o.unsqueeze(1)
        n = o.shape[-2]
        finite = torch.isfinite(o.reshape(-1, n, o.shape[-1]).sum(dim=-1, dtype=torch.float64)).all(dim=0)
        if bool(finite.all()):
            return
        bad = torch.nonzero(~finite).reshape(-1).cpu()
        ids = bad if sample_ids is None else torch.as_tensor(sample_ids).reshape(-1).cpu()[bad]
        raise NonFiniteOutputError(
            f"{self.name!r} returned NaN or infinite outputs on {len(bad)} of {n} {what} (e.g. sample "
            f"{int(ids[0])}), inside the bounds {self.bounds.describe()}. Non-finite outputs cannot be scored "
            "(argmax would call them class 0); look for a log, square root or division of the input in the model.")

    # ------------------------------------------------------------------ mode
    @contextlib.contextmanager
    def evaluating(self) -> Iterator["ModelUnderTest"]:
        """Eval mode and frozen parameters for the duration; every flag restored afterwards.

        The forward passes made inside are checked for non-finite outputs: when the block ends
        normally, one host sync tells whether any of them returned NaN or infinity, and if so it
        raises `NonFiniteOutputError` (with the count and the first offending input), so a NaN
        row is never scored (argmax would call it class 0).
        """
        module = self.module
        if self._evaluating == 0:
            self._guard.reset()
        self._evaluating += 1
        modes = [(m, m.training) for m in module.modules()] if isinstance(module, nn.Module) else []
        grads = [(p, p.requires_grad) for p in module.parameters()] if isinstance(module, nn.Module) else []
        try:
            if isinstance(module, nn.Module) and not is_exported(module):
                module.eval()
            for p, _ in grads:
                p.requires_grad_(False)
            yield self
            self._guard.check(self)
        finally:
            self._evaluating -= 1
            if self._evaluating == 0:
                self._guard.reset()
            for p, flag in grads:
                p.requires_grad_(flag)
            for m, flag in modes:
                m.training = flag

    # ------------------------------------------------------------------ inspection
    def inspect(self, x: torch.Tensor) -> ModelInspection:
        """Forward passes before any attack: output shape, kind and class count, determinism,
        finite outputs on every given input, and outputs that do not depend on the batch.

        - the first PROBE_SAMPLES inputs, twice: output shape; the output kind (probabilities are
          refused unless declared, and a declared kind the outputs contradict is refused);
          determinism;
        - every input, batch by batch: all outputs finite (NaN or infinity is refused, with the
          count and the first offending input);
        - BATCH_CHECK_SAMPLES inputs one at a time against the probe batch: outputs that depend on
          the batch's other samples (normalisation over the batch, batch norm in training mode
          baked into a traced or exported model) are refused; a difference above float
          rounding but small is warned about (see BATCH_LIMIT).

        Raises InputError (or NonFiniteOutputError) naming the problem, before any attack runs.
        """
        n = len(x)
        probe = self.to_device(x[: min(n, PROBE_SAMPLES)])
        with torch.no_grad(), self.evaluating():
            first = self._probe(probe)
            second = self._probe(probe)
            if first.dim() == 1:
                first, second = first.unsqueeze(1), second.unsqueeze(1)
            if first.dim() != 2 or first.shape[0] != probe.shape[0]:
                raise InputError("model", f"must return logits of shape (batch, classes); for a batch of "
                                          f"{probe.shape[0]} inputs of shape {tuple(probe.shape[1:])} it returned "
                                          f"shape {tuple(first.shape)}")
            self._check_all_finite(x, first)
            detected = _detect_output_kind(first)
            if self.output != "auto":
                problem = _declared_output_problem(self.output, first, detected, self._rounding())
                if problem:
                    raise InputError("output", problem)
            scale = float(first.abs().max().clamp_min(1e-12))
            diff = float((first - second).abs().max())
            deterministic = diff <= 1e-5 * scale
        chosen = self.output if self.output != "auto" else detected
        notes: list[str] = list(self.load_notes)
        if self.output == "auto" and detected in ("probs", "binary_prob"):
            raise InputError(
                "model",
                "returns probabilities (outputs are non-negative and each row sums to 1), not logits. "
                "Gradient attacks on probabilities under-report vulnerability because the softmax "
                "saturates. Pass the model without its final softmax, or set output='probs' "
                "(CLI: --output probs) to attack log(probabilities) knowingly.")
        batch_difference = None
        if deterministic:
            with torch.no_grad(), self.evaluating():
                batch_difference = self._batch_difference(probe, first, scale)
        if first.shape[1] == 1:
            if chosen in ("probs", "binary_prob"):
                self._output_transform = _binary_prob_to_logits
                chosen = "binary_prob"
            else:
                self._output_transform = _binary_logit_to_logits
                chosen = "binary_logit"
            notes.append("single output treated as a binary classifier: logits [0, z]")
        elif chosen == "probs":
            self._output_transform = _probs_to_logits
            notes.append("probabilities converted to log-probabilities; gradients vanish where they saturate")
        elif chosen == "log_probs":
            self._output_transform = None
            notes.append("log-probabilities used as logits (softmax and margins are unchanged)")
        else:
            self._output_transform = None
        if not deterministic:
            notes.append(f"forward pass is random: two passes on the same inputs differ by up to {diff:.3g}; "
                         "the batch-composition check was skipped")
            warnings.warn(f"model {self.name!r}: forward pass is not deterministic (two passes differ by up to "
                          f"{diff:.3g}); single-sample gradients may mislead attacks", RobustlabWarning, stacklevel=2)
        elif batch_difference is not None and batch_difference > self._rounding().batch_noise:
            notes.append(f"outputs on single inputs differ from those in a batch by up to {batch_difference:.3g} "
                         "of the output scale (more than float rounding)")
        num_classes = max(2, first.shape[1])
        if self.classes is not None and len(self.classes) != num_classes:
            raise InputError("classes", f"{len(self.classes)} class names given but the model has {num_classes} outputs")
        self.inspection = ModelInspection(num_classes=num_classes, input_shape=tuple(probe.shape[1:]),
                                          output_kind=chosen, deterministic=deterministic,
                                          max_repeat_difference=diff, notes=notes,
                                          max_batch_difference=batch_difference)
        return self.inspection

    def _probe(self, x: torch.Tensor, *, what: str | None = None) -> torch.Tensor:
        """raw() as __call__ runs it, with the model's own errors turned into an InputError."""
        try:
            return self.raw(_fast_layout(x))
        except InputError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
            # AssertionError: torch.export's input guards ("Guard failed: x.size()[2] == 8")
            message = _error_line(error)
            if what is not None:
                raise InputError("model", f"fails on {what}: {message}") from None
            raise InputError("x", f"the model cannot process inputs of shape {tuple(x.shape[1:])} "
                                  f"(dtype {x.dtype}): {message}") from None

    def _check_all_finite(self, x: torch.Tensor, probe_out: torch.Tensor) -> None:
        """Every input's outputs are finite: the probe's, then the rest batch by batch (one host
        sync per batch; this runs once, before any attack)."""
        from robustlab.batching import BatchRunner

        finite = [torch.isfinite(probe_out).reshape(len(probe_out), -1).all(dim=1).cpu()]
        rest = x[len(probe_out):]
        if len(rest):
            runner = BatchRunner(None, self.device, rest[0].numel())

            def one(a: int, b: int) -> torch.Tensor:
                out = self._probe(self.to_device(rest[a:b]))
                return torch.isfinite(out).reshape(b - a, -1).all(dim=1).cpu()

            finite += runner.run(len(rest), one)
        ok = torch.cat(finite)
        if not bool(ok.all()):
            bad = torch.nonzero(~ok).reshape(-1)
            raise NonFiniteOutputError(
                f"{self.name!r} returned NaN or infinite outputs for {len(bad)} of the {len(ok)} inputs "
                f"(e.g. input {int(bad[0])}, counting from 0), all inside the bounds {self.bounds.describe()}. "
                "Non-finite outputs cannot be scored (argmax would call them class 0); look for a log, square "
                "root or division of the input in the model, or check --bounds/--mean/--std.")

    def _batch_difference(self, probe: torch.Tensor, batch_out: torch.Tensor, scale: float) -> float | None:
        """Largest difference between outputs in the probe batch and the same inputs alone, relative
        to the largest output; refused above the limit, warned about above float rounding."""
        k = min(len(probe), BATCH_CHECK_SAMPLES)
        if k < 2:
            return None
        alone = torch.cat([self._probe(probe[i:i + 1], what="a batch of one input").reshape(1, -1)
                           for i in range(k)])
        batched = batch_out[:k].reshape(k, -1)
        if alone.shape != batched.shape:
            raise InputError("model", f"returns outputs of shape {tuple(alone.shape[1:])} for a single input but "
                                      f"{tuple(batched.shape[1:])} per input in a batch")
        gap = (batched.double() - alone.double()).abs().amax(dim=1)
        gap = torch.where(torch.isfinite(gap), gap, torch.full_like(gap, math.inf))
        relative = float(gap.max()) / scale
        flips = int((batched.argmax(dim=1) != alone.argmax(dim=1)).sum())
        limits = self._rounding()
        evidence = (f"outputs of {k} inputs evaluated one at a time differ from the same inputs in a batch of "
                    f"{len(probe)} by up to {relative:.3g} of the largest output ({flips} of {k} predictions "
                    "change)")
        if relative > limits.batch_limit:
            raise InputError(
                "model",
                f"outputs depend on the other samples in the batch: {evidence}. Results would change with "
                "the batch size (--batch-size) and with which samples are attacked together. Typical causes: "
                "batch norm in training mode baked into a traced or exported model (export it after "
                "model.eval()), or a forward pass that normalises over the batch dimension.")
        if relative > limits.batch_noise:
            warnings.warn(
                f"model {self.name!r}: {evidence}: more than float rounding explains "
                f"({limits.batch_noise:g} for {limits.label}) but below the refusal limit "
                f"({limits.batch_limit:g}). Check that the forward pass treats each sample on its own; "
                "results may depend on the batch size.", RobustlabWarning, stacklevel=3)
        return relative

    def _rounding(self) -> "_Rounding":
        return _rounding_for(self.dtype, self.device, self.amp)

    def describe(self) -> dict:
        """JSON-ready description for results metadata."""
        info: dict[str, Any] = {
            "name": self.name,
            "sha256": self.sha256(),
            "source": self.source,
            "parameters": self.parameter_count(),
            "bounds": self.bounds.to_json(),
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
            "classes": self.classes,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "amp": self.amp,
        }
        defense = getattr(self.module, "defense", None)
        if isinstance(defense, dict):
            info["defense"] = defense  # how a robustlab defense built this model (JSON-ready)
        if self.inspection is not None:
            i = self.inspection
            info.update(num_classes=i.num_classes, input_shape=list(i.input_shape), output_kind=i.output_kind,
                        deterministic=i.deterministic, max_repeat_difference=i.max_repeat_difference,
                        max_batch_difference=i.max_batch_difference, notes=i.notes)
        return info

    def __repr__(self) -> str:
        return f"ModelUnderTest(name={self.name!r}, bounds={self.bounds.describe()}, device={self.device})"


# ---------------------------------------------------------------------- guards
class _OutputGuard:
    """Counts, on the device and with no host sync, the rows of every forward pass that are not
    finite; `check` (one host sync) raises NonFiniteOutputError if there were any.

    Each `ModelUnderTest.__call__` inside `evaluating()` costs one reduction over its outputs: the
    float64 sum of each row, which is NaN or infinite exactly when the row holds a NaN or an
    infinity (float64 cannot overflow on sums of float32 or half-precision values), about 14 us
    on a CPU for a (450, 10) batch, against 36 us for isfinite(out).all(1). Every FOLD calls the
    pending row sums are folded into two device scalars (the count of non-finite rows, the
    first of them), so memory stays bounded in attacks with thousands of iterations. The
    per-call bookkeeping on the host (first row, gradient or not) only serves the message.
    """

    FOLD = 256

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pending: list[torch.Tensor] = []  # per call since the last fold: (rows,) float64 row sums
        self.pending_start = 0  # global row of the first pending row
        self.starts: list[int] = []  # every call's first global row
        self.gradient: list[bool] = []  # every call: made with gradients enabled
        self.rows = 0
        self.bad: torch.Tensor | None = None  # folded: rows that are not finite
        self.first: torch.Tensor | None = None  # folded: the first of them (global row), or 2**62 if none

    def record(self, out: torch.Tensor) -> None:
        out = out.detach()
        if out.dim() != 2:
            out = out.reshape(out.shape[0] if out.dim() else 1, -1)
        rows = out.shape[0]
        self.pending.append(out.sum(dim=1, dtype=torch.float64))
        self.starts.append(self.rows)
        self.gradient.append(torch.is_grad_enabled())
        self.rows += rows
        if len(self.pending) >= self.FOLD:
            self.fold()

    def fold(self) -> None:
        if not self.pending:
            return
        device = self.pending[0].device
        try:
            sums = torch.cat(self.pending)
        except RuntimeError:  # outputs on several devices (a model moved inside the block)
            sums = torch.cat([p.to(device) for p in self.pending])
        bad = ~torch.isfinite(sums)
        count = bad.sum()
        none = torch.full((), 1 << 62, dtype=torch.int64, device=device)
        first = torch.where(bad.any(), bad.to(torch.uint8).argmax().to(torch.int64) + self.pending_start, none)
        self.bad = count if self.bad is None else self.bad.to(device) + count
        self.first = first if self.first is None else torch.minimum(self.first.to(device), first)
        self.pending = []
        self.pending_start = self.rows

    def check(self, model: "ModelUnderTest") -> None:
        """Raise NonFiniteOutputError if any recorded row was not finite; then start afresh."""
        self.fold()
        if self.bad is None or self.first is None:
            return
        bad, first = (int(v) for v in torch.stack([self.bad, self.first.to(self.bad.device)]).tolist())
        if not bad:
            self.reset()
            return
        call = bisect.bisect_right(self.starts, first) - 1
        start = self.starts[call]
        size = (self.starts[call + 1] if call + 1 < len(self.starts) else self.rows) - start
        kind = "with gradients" if self.gradient[call] else "a prediction pass"
        calls, rows = len(self.starts), self.rows
        self.reset()
        raise NonFiniteOutputError(
            f"{model.name!r} returned NaN or infinite outputs for {bad} of the {rows} inputs of {calls} forward "
            f"passes (the first: input {first - start} of a batch of {size} in pass {call + 1}, {kind}), on "
            f"inputs inside the bounds {model.bounds.describe()} made during an attack or evaluation. Non-finite "
            "outputs cannot be scored (argmax would call them class 0); look for a log, square root or "
            "division of the input in the model.")


@dataclass(frozen=True)
class _Rounding:
    """How far outputs may move under float reassociation alone, relative to the largest output."""

    label: str
    batch_noise: float  # above: warned about (more than rounding)
    batch_limit: float  # above: refused (the outputs depend on the batch)
    sum_tolerance: float  # probabilities' row sums, log-probabilities' logsumexp: |. - 1|, |.| at most


# Batch vs single input: the same arithmetic in a different order (GEMM/convolution blocking and
# algorithms chosen per batch size). Measured on the CPU (tests/test_model_guards.py): 2e-7 of the
# largest logit in float32 (DigitsCNN, a BatchNorm ResNet), 1e-16 in float64, 0 in float16 and
# bfloat16. On a GPU, float32 convolutions run in TF32 by default (10-bit mantissa, 5e-4 unit
# roundoff) and half precision has 5e-4 (float16) or 4e-3 (bfloat16): a few units, about 1e-2 at
# most. Real dependence is far larger: a model that normalises over the batch or a traced batch
# norm in training mode differs by 0.77 to 1.0 of the largest logit between a sample alone and in
# a batch (NaN where a single sample's variance is 0), and a model mixing in only 1% of the batch
# mean by 8e-3. Hence: refuse above 5e-2 (5x the worst rounding, 15x below real dependence), warn
# above 1e-4 in float32/float64 on the CPU (500x the measured rounding) and above 1e-2 where TF32 or
# half precision is in play.
BATCH_LIMIT = 5e-2


def _rounding_for(dtype: torch.dtype, device: torch.device, amp: bool) -> _Rounding:
    if amp or dtype in (torch.float16, torch.bfloat16):
        unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        return _Rounding(f"{'mixed precision' if amp else str(dtype).replace('torch.', '')}", 1e-2, BATCH_LIMIT,
                         max(1e-3, 16 * unit))
    tf32 = device.type == "cuda" and dtype == torch.float32 and bool(
        torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    if tf32:
        return _Rounding("float32 with TF32 on the GPU", 1e-2, BATCH_LIMIT, 1e-3)
    return _Rounding(str(dtype).replace("torch.", ""), 1e-4, BATCH_LIMIT, 1e-3)


def _declared_output_problem(declared: str, out: torch.Tensor, detected: str, rounding: _Rounding) -> str | None:
    """Why `out` (the probe's outputs) cannot be of the declared kind, or None if it can.

    "logits" fits any finite outputs (it is how a user overrides a detector that took logits
    for probabilities). "probs" needs non-negative rows summing to 1 (one output: values in
    [0, 1]); "log_probs" non-positive rows whose logsumexp is 0 (one output: nothing to check).
    The tolerances are far wider than the detector's, so a genuine softmax in low precision
    or with many classes is never refused.
    """
    if declared not in ("probs", "log_probs"):
        return None
    o = out.double().reshape(len(out), -1)
    tol = rounding.sum_tolerance
    flag = f"output={declared!r} (CLI: --output {declared})"
    looks = {"logits": "logits", "log_probs": "log-probabilities", "probs": "probabilities",
             "binary_logit": "a binary logit", "binary_prob": "a binary probability"}[detected]
    if o.shape[1] == 1:
        if declared != "probs":
            return None
        outside = ((o < 0) | (o > 1)).reshape(-1)
        if not bool(outside.any()):
            return None
        row = int(torch.nonzero(outside)[0])
        return (f"declared {flag}, but the model's single output is not a probability: input {row} gives "
                f"{float(o[row, 0]):.4g}, outside [0, 1]. Attacking it as a probability inflates robustness; "
                "drop the declaration (output='auto' treats it as a binary logit)")
    if declared == "probs":
        wrong = (o < -1e-6).any(dim=1) | ((o.sum(dim=1) - 1).abs() > tol)
        what = "probabilities (non-negative, each row summing to 1)"
    else:
        wrong = (o > tol).any(dim=1) | (torch.logsumexp(o, dim=1).abs() > tol)
        what = "log-probabilities (at most 0, each row's logsumexp 0)"
    if not bool(wrong.any()):
        return None
    row = int(torch.nonzero(wrong)[0])
    example = (f"input {row}: smallest {float(o[row].min()):.4g}, largest {float(o[row].max()):.4g}, "
               f"sum {float(o[row].sum()):.4g}, logsumexp {float(torch.logsumexp(o[row], 0)):.4g}")
    consequence = ("Treating them as probabilities (attacking their log) clamps every negative output and "
                   "kills its gradient, which inflates robustness. " if declared == "probs" else "")
    return (f"declared {flag}, but the outputs are not {what}: {int(wrong.sum())} of {len(o)} probe inputs "
            f"contradict it ({example}); they look like {looks}. {consequence}Drop the declaration: "
            "output='auto' (the default) detects logits, log-probabilities and probabilities")


# ---------------------------------------------------------------------- helpers
def _error_line(error: BaseException) -> str:
    """The informative line of a model's error: the first, except for TorchScript's interpreter
    errors, whose first line is a generic header and whose last names the failing operation."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        return lines[-1][:300]
    return lines[0][:300]


def _probs_to_logits(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def _binary_logit_to_logits(z: torch.Tensor) -> torch.Tensor:
    z = z.reshape(-1, 1)
    return torch.cat([torch.zeros_like(z), z], dim=1)


def _binary_prob_to_logits(p: torch.Tensor) -> torch.Tensor:
    p = p.reshape(-1, 1).clamp(torch.finfo(p.dtype).tiny, 1 - torch.finfo(p.dtype).eps)
    return _binary_logit_to_logits(torch.log(p) - torch.log1p(-p))


def _detect_output_kind(out: torch.Tensor) -> str:
    """Probabilities sum to 1 up to the rounding of the model's dtype; logits essentially never do."""
    tolerance = 2e-3 if out.dtype in (torch.float16, torch.bfloat16) else 2e-5
    out = out.double()
    if out.shape[1] == 1:
        varies = out.numel() > 1 and bool(out.std() > 0)
        return "binary_prob" if bool(((out >= 0) & (out <= 1)).all()) and varies else "binary_logit"
    if bool((out >= 0).all()) and bool(((out.sum(dim=1) - 1).abs() < tolerance).all()):
        return "probs"
    if bool((out <= 0).all()) and bool((torch.logsumexp(out, dim=1).abs() < tolerance).all()):
        return "log_probs"
    return "logits"


def _broadcast_stat(name: str, stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    stat = stat.to(device=x.device, dtype=x.dtype)
    features = tuple(x.shape[1:])
    if stat.numel() == 1:
        return stat.reshape(())
    if len(features) >= 2 and stat.numel() == features[0]:
        return stat.reshape(1, features[0], *([1] * (len(features) - 1)))
    if stat.numel() == math.prod(features):
        return stat.reshape(1, *features)
    if len(features) == 1 and stat.numel() == features[0]:
        return stat.reshape(1, -1)
    raise InputError(name, f"has {stat.numel()} values, which fits neither the {features[0]} channels nor the "
                           f"{math.prod(features)} features of inputs shaped {features}")


def _module_device(module: object) -> torch.device:
    if isinstance(module, nn.Module):
        for t in list(module.parameters()) + list(module.buffers()):
            return t.device
    return torch.device("cpu")


def _module_dtype(module: object) -> torch.dtype:
    if isinstance(module, nn.Module):
        for t in module.parameters():
            if t.is_floating_point():
                return t.dtype
    return torch.float32


def is_exported(module: nn.Module) -> bool:
    """Modules from torch.export: their train/eval mode is fixed at export time (eval() raises)."""
    return bool(getattr(type(module), "robustlab_exported", False)) or any(
        cls.__name__ == "_StatefulGraphModule" for cls in type(module).__mro__)


def _is_exported_program(value: object) -> bool:
    return type(value).__name__ == "ExportedProgram" and callable(getattr(value, "module", None))


def _default_name(module: object) -> str:
    return type(module).__name__


def state_dict_sha256(module: nn.Module) -> str:
    """A stable hash of a module's parameters and buffers (names, dtypes, shapes and values).

    Every tensor of the state dict counts, whatever its shape or dtype: 0-dim buffers (batch
    norm's `num_batches_tracked`), non-contiguous views, bool, bfloat16, complex, quantized,
    sparse. Values are hashed as their raw bytes, so the digest is the same in every run (on
    machines of the same byte order). Non-tensor entries (a module's extra state) count by
    name and type only.
    """
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            h.update(f"{key}:{type(value).__module__}.{type(value).__qualname__}".encode())
            continue
        h.update(key.encode())
        h.update(str(value.dtype).encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(tensor_bytes(value))
    return h.hexdigest()


def tensor_bytes(value: torch.Tensor) -> bytes:
    """The values of a tensor as bytes, in row-major order (b"" when it is empty)."""
    t = value.detach()
    if t.device.type == "meta":
        raise InputError("model", "has tensors on the 'meta' device (no values); load its weights first")
    if t.is_sparse or t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:  # the integer representation and how it maps to reals
        scheme = t.qscheme()
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            params = f"{scheme}:{t.q_scale()!r}:{t.q_zero_point()}".encode()
        else:
            params = (f"{scheme}:{t.q_per_channel_axis()}:".encode()
                      + tensor_bytes(t.q_per_channel_scales()) + tensor_bytes(t.q_per_channel_zero_points()))
        return params + tensor_bytes(t.int_repr())
    if t.numel() == 0:
        return b""
    t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)  # reshape: 0-dim -> 1 element
    return t.view(torch.uint8).numpy().tobytes()


def file_sha256(*paths: str) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself, restrided so that PyTorch runs convolutions on it in channels_last on the CPU.

    A contiguous one-channel image batch is NCHW- and channels_last-contiguous at once; the
    strides of its size-1 channel dimension decide which kernels PyTorch picks. Attack iterates
    get NCHW strides (64, 64, 8, 1), the slow choice: DigitsCNN's forward took 4.6 ms on 200
    samples against 1.8 ms with strides (64, 1, 8, 1), forward+backward 8.5 against 6.8 ms
    (bench/RESULTS.md, "memory layout"). Same data, no copy, still contiguous, so the model's
    own views and reshapes work unchanged; only the kernels (and float rounding, about 1e-6) differ.
    """
    if x.dim() == 4 and x.shape[1] == 1 and x.device.type == "cpu" and x.is_contiguous() and x.stride(1) != 1:
        return x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), x.stride(3)))
    return x
