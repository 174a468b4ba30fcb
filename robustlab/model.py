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

import contextlib
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from robustlab.errors import InputError
from robustlab.threat import Bounds

OUTPUT_KINDS = ("auto", "logits", "log_probs", "probs")


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


def _as_bounds(bounds: Bounds | tuple | Sequence[float] | None) -> Bounds:
    if bounds is None:
        return Bounds(0.0, 1.0)
    if isinstance(bounds, Bounds):
        return bounds
    try:
        low, high = bounds  # type: ignore[misc]
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

    # ------------------------------------------------------------------ basics
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

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The module's own output on inputs in the user's space (normalisation applied)."""
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
        return out.float() if self.amp else out

    def move_to(self, device: torch.device) -> None:
        """Move the wrapped module (an explicit request; robustlab never moves models on its own)."""
        if isinstance(self.module, nn.Module):
            self.module.to(device)
        self._device = device
        self._stats_cache.clear()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (B, num_classes), for inputs in the declared box."""
        out = self.raw(_fast_layout(x))
        if self._output_transform is not None:
            out = self._output_transform(out)
        return out

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype, non_blocking=True)

    # ------------------------------------------------------------------ mode
    @contextlib.contextmanager
    def evaluating(self) -> Iterator["ModelUnderTest"]:
        """Eval mode and frozen parameters for the duration; every flag restored afterwards."""
        module = self.module
        if not isinstance(module, nn.Module):
            yield self
            return
        modes = [(m, m.training) for m in module.modules()]
        grads = [(p, p.requires_grad) for p in module.parameters()]
        try:
            if not is_exported(module):
                module.eval()
            for p, _ in grads:
                p.requires_grad_(False)
            yield self
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)
            for m, flag in modes:
                m.training = flag

    # ------------------------------------------------------------------ inspection
    def inspect(self, x: torch.Tensor) -> ModelInspection:
        """Probe forward passes: output shape and kind, class count, determinism.

        Raises InputError for outputs that are not usable logits, before any attack runs.
        """
        x = self.to_device(x[: min(len(x), 64)])
        try:
            with torch.no_grad(), self.evaluating():
                first = self.raw(x)
                second = self.raw(x)
        except InputError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            message = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise InputError("x", f"the model cannot process inputs of shape {tuple(x.shape[1:])} "
                                  f"(dtype {x.dtype}): {message}") from None
        if first.dim() == 1:
            first, second = first.unsqueeze(1), second.unsqueeze(1)
        if first.dim() != 2 or first.shape[0] != x.shape[0]:
            raise InputError("model", f"must return logits of shape (batch, classes); for a batch of {x.shape[0]} "
                                      f"inputs of shape {tuple(x.shape[1:])} it returned shape {tuple(first.shape)}")
        if not torch.isfinite(first).all():
            raise InputError("model", "returned NaN or infinite outputs on valid inputs")
        detected = _detect_output_kind(first)
        chosen = self.output if self.output != "auto" else detected
        notes: list[str] = []
        if self.output == "auto" and detected in ("probs", "binary_prob"):
            raise InputError(
                "model",
                "returns probabilities (outputs are non-negative and each row sums to 1), not logits. "
                "Gradient attacks on probabilities under-report vulnerability because the softmax "
                "saturates. Pass the model without its final softmax, or set output='probs' "
                "(CLI: --output probs) to attack log(probabilities) knowingly.")
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
        scale = float(first.abs().max().clamp_min(1e-12))
        diff = float((first - second).abs().max())
        deterministic = diff <= 1e-5 * scale
        if not deterministic:
            notes.append(f"forward pass is random: two passes on the same inputs differ by up to {diff:.3g}")
            warnings.warn(f"model {self.name!r}: forward pass is not deterministic (two passes differ by up to "
                          f"{diff:.3g}); single-sample gradients may mislead attacks", RobustlabWarning, stacklevel=2)
        num_classes = max(2, first.shape[1])
        if self.classes is not None and len(self.classes) != num_classes:
            raise InputError("classes", f"{len(self.classes)} class names given but the model has {num_classes} outputs")
        self.inspection = ModelInspection(num_classes=num_classes, input_shape=tuple(x.shape[1:]),
                                          output_kind=chosen, deterministic=deterministic,
                                          max_repeat_difference=diff, notes=notes)
        return self.inspection

    def describe(self) -> dict:
        """JSON-ready description for results metadata."""
        info = {
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
                        deterministic=i.deterministic, max_repeat_difference=i.max_repeat_difference, notes=i.notes)
        return info

    def __repr__(self) -> str:
        return f"ModelUnderTest(name={self.name!r}, bounds={self.bounds.describe()}, device={self.device})"


# ---------------------------------------------------------------------- helpers
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
    return any(cls.__name__ == "_StatefulGraphModule" for cls in type(module).__mro__)


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
