#!/usr/bin/env python
"""Speed of robustlab's FGSM / PGD / CW against the floor and against foolbox, torchattacks and ART.

For every (model, attack) pair, all methods run on the same batch, on the same module (eval mode,
parameters frozen), in one process: after a warm-up, repetitions are interleaved (the order rotates
each round) and the median wall time is reported.

- floor: k forward+backward passes of the bare module, input gradients only
  (x.requires_grad_(True); torch.autograd.grad(loss.sum(), x)); k = 1 (FGSM), 20 (PGD), 100 (CW).
  Nothing can run the attack with fewer passes.
- robustlab: the public API (`FGSM/PGD/CW(...)(ModelUnderTest, x, y, batch_size=B)`), which also
  runs the mandatory verification forward pass on the tensor it returns.
- peers: the same attack in foolbox, torchattacks and ART at the same settings where the library
  allows it (see bench/README.md for the differences that remain).

Columns: time (median s), passes (full-batch equivalents: grad forwards / backwards / no-grad
forwards, counted by a hook on the module), x floor, x (floor + verification) = time divided by
floor + the one no-grad forward robustlab must run anyway, x robustlab (peer / robustlab), both
paired by round, success (fresh forward on the returned batch: fraction misclassified; a sanity
check only). bg: CPU cores other processes used while the row was timed.

Run `python bench/attacks.py --help`. GPU: `--device cuda --amp` (exits cleanly without one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from resnet import resnet18  # noqa: E402  (bench/resnet.py)

ATTACK_STEPS = {"fgsm": 1, "pgd": 20, "cw": 100}
ATTACK_LABEL = {"fgsm": "FGSM", "pgd": "PGD-20", "cw": "CW-100"}
# Passes robustlab must run on top of the k forward+backward passes, by design: the verification
# forward on exactly the tensor it returns (every attack, every call).
VERIFICATION_FORWARDS = 1
TARGETS = {"fgsm": 1.05, "pgd": 1.05, "cw": 1.15}
PEERS = ("foolbox", "torchattacks", "art")
CW_LR, CW_CONST = 0.01, 1.0  # identical for every library (CW speed does not depend on them)
DEFAULT_REPEATS = {  # (model, attack) -> timed repetitions after the warm-up
    ("digits", "fgsm"): 21, ("digits", "pgd"): 11, ("digits", "cw"): 7,
    ("resnet", "fgsm"): 7, ("resnet", "pgd"): 3, ("resnet", "cw"): 3,
}


# ----------------------------------------------------------------------------- environment
def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


class CpuMonitor:
    """CPU time used by *other* processes while we measure, in cores (Linux /proc/stat).

    On a shared machine a busy neighbour inflates and scatters wall times; this column says how
    much of the machine was not ours. 0.0 = clean; 1.0 = one of the cores was busy elsewhere.
    """

    def __init__(self) -> None:
        self.available = os.path.exists("/proc/stat")
        self.hz = os.sysconf("SC_CLK_TCK") if self.available else 100
        self.busy = self.own = self.wall = 0.0

    def _now(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        times = os.times()
        return ((sum(values) - values[3] - values[4]) / self.hz, times.user + times.system, time.monotonic())

    def start(self) -> None:
        if self.available:
            self._mark = self._now()

    def stop(self) -> float | None:
        """Stop the interval; return the other processes' use during it, in cores."""
        if not self.available:
            return None
        busy, own, wall = (b - a for a, b in zip(self._mark, self._now()))
        self.busy += busy
        self.own += own
        self.wall += wall
        return max(0.0, (busy - own) / wall) if wall > 0 else None

    def discard(self, busy: float, own: float, wall: float) -> None:
        self.busy -= busy
        self.own -= own
        self.wall -= wall

    def cores(self) -> float | None:
        if not self.available or self.wall < 1.0:  # 10 ms ticks: shorter totals are noise
            return None
        return max(0.0, (self.busy - self.own) / self.wall)

    @staticmethod
    def sample(seconds: float = 1.0) -> float | None:
        m = CpuMonitor()
        if not m.available:
            return None
        m.start()
        time.sleep(seconds)
        m.stop()
        return m.cores()


def wait_for_idle(limit_s: float, log: Callable[[str], None], threshold: float = 0.15) -> float | None:
    """Wait (up to limit_s) until other processes use less than `threshold` cores."""
    deadline = time.monotonic() + limit_s
    load = CpuMonitor.sample(1.0)
    while load is not None and load > threshold and time.monotonic() < deadline:
        log(f"  waiting for the machine: other processes use {load:.2f} cores")
        time.sleep(4.0)
        load = CpuMonitor.sample(1.0)
    return load


def robustlab_revision() -> str:
    """robustlab's version, plus the git commit of the checkout it runs from (and whether it is dirty)."""
    import subprocess

    import robustlab
    version = getattr(robustlab, "__version__", "?")
    root = Path(robustlab.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version} (git {commit}{', modified' if dirty else ''})" if commit else version


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def import_peer(name: str) -> tuple[Any, str]:
    """(module, version) or raise ImportError with the reason."""
    if name == "foolbox":
        import foolbox as module
    elif name == "torchattacks":
        import torchattacks as module
    elif name == "art":
        import art as module
        from art.attacks.evasion import (CarliniL2Method, FastGradientMethod,  # noqa: F401
                                         ProjectedGradientDescentPyTorch)
        from art.estimators.classification import PyTorchClassifier  # noqa: F401
    else:
        raise ImportError(f"unknown peer {name!r}")
    return module, getattr(module, "__version__", "?")


# ----------------------------------------------------------------------------- pass counting
class PassCounter:
    """Forward hook on the module: rows through grad / no-grad forwards, and through backwards.

    Costs one Python call per forward (and per backward): microseconds, the same for every method.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.grad_rows = self.nograd_rows = self.bwd_rows = 0
        self.enabled = True
        self._handle = module.register_forward_hook(self._forward)

    def reset(self) -> None:
        self.grad_rows = self.nograd_rows = self.bwd_rows = 0

    def _forward(self, module, args, output) -> None:
        if not self.enabled:
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, torch.Tensor):
            return
        if out.requires_grad:
            self.grad_rows += out.shape[0]
            out.register_hook(self._backward)
        else:
            self.nograd_rows += out.shape[0]

    def _backward(self, grad: torch.Tensor) -> None:
        if self.enabled:
            self.bwd_rows += grad.shape[0]

    def snapshot(self, batch: int) -> tuple[float, float, float]:
        return (self.grad_rows / batch, self.bwd_rows / batch, self.nograd_rows / batch)

    def remove(self) -> None:
        self._handle.remove()


# ----------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """One model and one batch, shared by every method."""

    name: str
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    num_classes: int
    device: torch.device
    description: str
    mut: Any = None
    cache: dict = field(default_factory=dict)  # per-peer wrappers built once (outside timing)

    @property
    def batch(self) -> int:
        return len(self.x)


def make_problem(name: str, batch: int, device: torch.device) -> Problem:
    generator = torch.Generator().manual_seed(0)
    if name == "digits":
        from robustlab.data import digits_split
        from robustlab.demo import digits_cnn

        model, _ = digits_cnn()
        data = digits_split("test")
        n = min(batch, len(data))
        # digits_split's x has strides (64, 1, 8, 1): with one channel PyTorch reads that as
        # channels_last, and on the CPU the clean batch then runs ~2x faster through this CNN than any
        # computed tensor (x + delta is NCHW). Every attack iterate is NCHW, so the floor must be too.
        x = data.x[:n].clone(memory_format=torch.contiguous_format)
        y, eps = data.y[:n].clone(), 0.1
        description = f"robustlab.zoo.DigitsCNN (trained demo weights), 1x8x8, digits test[:{n}]"
    elif name == "resnet":
        model = resnet18(num_classes=10, seed=0)
        x = torch.rand(batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        eps = 8 / 255
        description = "ResNet-18 (bench/resnet.py, random init), 3x32x32, uniform random inputs and labels"
    else:
        raise SystemExit(f"unknown model {name!r}; expected digits or resnet")
    model = model.eval().to(device)
    for p in model.parameters():  # every method gets the same frozen module
        p.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    return Problem(name, model, x.to(device), y.to(device), eps, 10, device,
                   f"{description}; {params / 1e6:.2f} M parameters")


# ----------------------------------------------------------------------------- methods
# A builder takes (problem, k) and returns a zero-argument callable that runs the attack once on
# the whole batch and returns the adversarial batch (a tensor on any device, or a numpy array).
Builder = Callable[[Problem, int], Callable[[], Any]]


def floor_builder(amp: bool = False) -> Builder:
    def build(p: Problem, k: int) -> Callable[[], Any]:
        def run() -> torch.Tensor:
            grad = None
            for _ in range(k):
                x = p.x.detach().requires_grad_(True)
                if amp:
                    with torch.autocast(device_type=p.device.type, dtype=torch.float16):
                        logits = p.model(x)
                else:
                    logits = p.model(x)
                loss = F.cross_entropy(logits.float(), p.y, reduction="none")
                (grad,) = torch.autograd.grad(loss.sum(), x)
            return p.x  # the clean batch: the floor is not an attack
        return run
    return build


def robustlab_supports_amp() -> bool:
    import inspect as pyinspect

    from robustlab.model import ModelUnderTest
    return "amp" in pyinspect.signature(ModelUnderTest.__init__).parameters


def robustlab_builder(attack: str, amp: bool = False) -> Builder:
    from robustlab.attacks import CW, FGSM, PGD
    from robustlab.model import ModelUnderTest

    def build(p: Problem, k: int) -> Callable[[], Any]:
        mut = p.mut
        if amp:  # ModelUnderTest(amp=True): float16 autocast inside the wrapper (CUDA only)
            if "robustlab_amp" not in p.cache:
                p.cache["robustlab_amp"] = ModelUnderTest(p.model, bounds=(0.0, 1.0), amp=True)
                p.cache["robustlab_amp"].inspect(p.x)
            mut = p.cache["robustlab_amp"]
        if attack == "fgsm":
            atk = FGSM(eps=p.eps)
        elif attack == "pgd":
            atk = PGD(eps=p.eps, steps=k, norm="linf")  # step 2.5 eps / steps, random start
        else:
            atk = CW(steps=k, binary_search_steps=1, abort_early=False, lr=CW_LR, initial_const=CW_CONST)
        return lambda: atk(mut, p.x, p.y, batch_size=p.batch).x_adv
    return build


def foolbox_builder(attack: str) -> Builder:
    import foolbox as fb

    def build(p: Problem, k: int) -> Callable[[], Any]:
        if "foolbox" not in p.cache:
            p.cache["foolbox"] = fb.PyTorchModel(p.model, bounds=(0.0, 1.0), device=p.device)
        fmodel = p.cache["foolbox"]
        if attack == "fgsm":
            atk, eps = fb.attacks.FGSM(), p.eps
        elif attack == "pgd":
            atk, eps = fb.attacks.LinfPGD(steps=k, rel_stepsize=2.5 / k, random_start=True), p.eps
        else:
            atk = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=1, steps=k, stepsize=CW_LR,
                                                   initial_const=CW_CONST, confidence=0, abort_early=False)
            eps = None
        return lambda: atk(fmodel, p.x, p.y, epsilons=eps)[1]
    return build


def torchattacks_builder(attack: str) -> Builder:
    import torchattacks as ta

    def build(p: Problem, k: int) -> Callable[[], Any]:
        if attack == "fgsm":
            atk = ta.FGSM(p.model, eps=p.eps)
        elif attack == "pgd":
            atk = ta.PGD(p.model, eps=p.eps, alpha=2.5 * p.eps / k, steps=k, random_start=True)
        else:  # no abort-early switch: torchattacks' CW always checks every steps/10
            atk = ta.CW(p.model, c=CW_CONST, kappa=0, steps=k, lr=CW_LR)
        return lambda: atk(p.x, p.y)
    return build


def art_builder(attack: str) -> Builder:
    from art.attacks.evasion import CarliniL2Method, FastGradientMethod, ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    def build(p: Problem, k: int) -> Callable[[], Any]:
        if "art" not in p.cache:
            classifier = PyTorchClassifier(
                model=p.model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(p.x.shape[1:]),
                nb_classes=p.num_classes, clip_values=(0.0, 1.0),
                device_type="gpu" if p.device.type == "cuda" else "cpu")
            # ART's API is numpy: the host copies of the batch are made once, outside the timing.
            p.cache["art"] = (classifier, p.x.cpu().numpy(), p.y.cpu().numpy())
        classifier, x_np, y_np = p.cache["art"]
        if attack == "fgsm":
            atk = FastGradientMethod(classifier, norm=np.inf, eps=p.eps, batch_size=p.batch)
        elif attack == "pgd":
            atk = ProjectedGradientDescentPyTorch(classifier, norm=np.inf, eps=p.eps, eps_step=2.5 * p.eps / k,
                                                  max_iter=k, num_random_init=1, batch_size=p.batch,
                                                  verbose=False)
        else:
            atk = CarliniL2Method(classifier, confidence=0.0, learning_rate=CW_LR, binary_search_steps=1,
                                  max_iter=k, initial_const=CW_CONST, batch_size=p.batch, verbose=False)
        return lambda: atk.generate(x=x_np, y=y_np)
    return build


PEER_BUILDERS = {"foolbox": foolbox_builder, "torchattacks": torchattacks_builder, "art": art_builder}


@dataclass
class Method:
    name: str
    build: Builder
    is_peer: bool = False
    times: list[float] = field(default_factory=list)
    passes: tuple[float, float, float] | None = None
    success: float | None = None
    scaled_from: int | None = None  # measured at this k and scaled linearly to the full k
    error: str | None = None
    runner: Callable[[], Any] | None = None
    monitor: CpuMonitor = field(default_factory=CpuMonitor)
    max_rounds: int | None = None  # a slow peer is timed in the first rounds only
    discarded: int = 0  # calls thrown away because other processes were busy
    rounds: dict[int, float] = field(default_factory=dict)  # round index -> seconds


# ----------------------------------------------------------------------------- measuring
def timed(run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    started = time.perf_counter()
    out = run()
    sync(device)
    return time.perf_counter() - started, out


def success_rate(p: Problem, x_adv: Any) -> float:
    x_adv = torch.as_tensor(x_adv).to(device=p.device, dtype=p.x.dtype)
    with torch.no_grad():
        return float((p.model(x_adv).argmax(dim=1) != p.y).double().mean())


def reference_times(p: Problem, repeats: int, busy: float = 0.25, retries: int = 0) -> dict:
    """Median time of one no-grad forward and of one forward+backward (input gradients only)."""
    one_grad = floor_builder()(p, 1)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return p.model(p.x)

    for _ in range(2):
        forward(), one_grad()
    fwd, fwdbwd, monitor = [], [], CpuMonitor()
    while len(fwd) < repeats:
        monitor.start()
        a = timed(forward, p.device)[0]
        b = timed(one_grad, p.device)[0]
        background = monitor.stop()
        if background is not None and background > busy and retries > 0:
            retries -= 1
            time.sleep(0.5)
            continue
        fwd.append(a)
        fwdbwd.append(b)
    return {"forward_s": statistics.median(fwd), "forward_backward_s": statistics.median(fwdbwd),
            "background_cores": monitor.cores()}


def bench_attack(p: Problem, attack: str, methods: list[Method], repeats: int, counter: PassCounter | None,
                 max_run_s: float, max_cell_s: float, log: Callable[[str], None], *, busy: float = 0.25,
                 retries: int = 0, idle_wait_s: float = 30.0) -> None:
    k = ATTACK_STEPS[attack]
    k_warm = min(k, 2)
    live: list[Method] = []
    floor_estimate = 0.0
    # Warm-up at k_warm (kernels, allocators, lazy imports), which also prices one call.
    for m in methods:
        try:
            m.runner = m.build(p, k)
            warm = m.build(p, k_warm) if k_warm != k else m.runner
            seconds, _ = timed(warm, p.device)
        except Exception as error:  # noqa: BLE001 - one broken peer must not stop the benchmark
            m.error = f"{type(error).__name__}: {error}".splitlines()[0][:120]
            log(f"  {m.name}: failed in warm-up: {m.error}")
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            continue
        estimate = seconds * k / k_warm
        if m.is_peer and estimate > max_run_s / 2:
            # Looks slow: price it again (the first call pays one-off costs) before deciding.
            estimate = min(estimate, timed(warm, p.device)[0] * k / k_warm)
        k_small = max(k_warm, min(k - 1, int(k * max_run_s / estimate)))
        if m.is_peer and estimate > max_run_s and k_small < 0.8 * k:
            # Too slow to run in full: time it once at fewer iterations and scale linearly.
            log(f"  {m.name}: ~{estimate:.0f} s per call estimated > --max-run-seconds {max_run_s:g}; "
                f"measuring once at k={k_small} and scaling to k={k}")
            scaled = m.build(p, k_small)
            for attempt in range(2 if retries else 1):
                if counter is not None:
                    counter.reset()
                snapshot = (m.monitor.busy, m.monitor.own, m.monitor.wall)
                m.monitor.start()
                seconds, out = timed(scaled, p.device)
                background = m.monitor.stop()
                if background is None or background <= busy or attempt == 1 or not retries:
                    break
                m.discarded += 1
                m.monitor.discard(*(now - then for now, then in zip(
                    (m.monitor.busy, m.monitor.own, m.monitor.wall), snapshot)))
                log(f"  {m.name}: discarded a busy call (other processes used {background:.2f} cores); re-running")
                wait_for_idle(idle_wait_s, log)
            m.times = [seconds * k / k_small]
            m.scaled_from = k_small
            if counter is not None:
                m.passes = tuple(v * k / k_small for v in counter.snapshot(p.batch))
            m.success = success_rate(p, out)
            continue
        if m.name == "floor":
            floor_estimate = estimate
        if m.is_peer and estimate * repeats > max_cell_s and estimate > 3 * floor_estimate:
            m.max_rounds = max(1, int(max_cell_s / estimate))
            log(f"  {m.name}: ~{estimate:.1f} s per call; timed in {m.max_rounds} of the {repeats} rounds only")
        live.append(m)
    # Timed rounds, interleaved; the order rotates every round. A call during which other processes
    # used more than `busy` cores is discarded and re-run (at most `retries` times per method).
    # Calls too short to judge one by one (/proc/stat counts 10 ms ticks) are judged together: if
    # the machine was busy over the whole cell, the cell's rounds are run again (at most twice).
    for cell_attempt in range(3 if retries else 1):
        for m in live:
            m.times, m.rounds = [], {}
            m.monitor = CpuMonitor()
        run_rounds(p, live, repeats, counter, busy, retries, idle_wait_s, log)
        monitors = [m.monitor for m in live]
        wall = sum(mon.wall for mon in monitors)
        if not live or wall < 1.0 or not monitors[0].available:
            break
        background = max(0.0, sum(mon.busy - mon.own for mon in monitors) / wall)
        if background <= busy or cell_attempt == 2 or not retries:
            break
        log(f"  other processes used {background:.2f} cores during this cell: running its rounds again")
        for m in live:
            m.discarded += len(m.times)
        wait_for_idle(idle_wait_s, log)


def run_rounds(p: Problem, live: list[Method], repeats: int, counter: PassCounter | None, busy: float,
               retries: int, idle_wait_s: float, log: Callable[[str], None]) -> None:
    for r in range(repeats):
        shift = r % len(live) if live else 0
        for m in live[shift:] + live[:shift]:
            if m.max_rounds is not None and len(m.times) >= m.max_rounds:
                continue
            while True:
                if counter is not None:
                    counter.reset()
                snapshot = (m.monitor.busy, m.monitor.own, m.monitor.wall)
                m.monitor.start()
                seconds, out = timed(m.runner, p.device)
                background = m.monitor.stop()
                # /proc/stat counts in 10 ms ticks: only calls of 0.5 s or more can be judged.
                if background is None or seconds < 0.5 or background <= busy or m.discarded >= retries:
                    break
                m.discarded += 1
                m.monitor.discard(*(now - then for now, then in zip(
                    (m.monitor.busy, m.monitor.own, m.monitor.wall), snapshot)))
                log(f"  {m.name}: discarded a {seconds:.3f} s call (other processes used {background:.2f} cores); "
                    "re-running")
                wait_for_idle(idle_wait_s, log)
            m.times.append(seconds)
            m.rounds[r] = seconds
            if counter is not None:
                m.passes = counter.snapshot(p.batch)
            m.success = success_rate(p, out)  # outside the timing
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{m.name} {m.times[-1]:.3f}s" for m in live))


# ----------------------------------------------------------------------------- reporting
def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 10:
        return f"{seconds:.1f}"
    if seconds >= 0.1:
        return f"{seconds:.3f}"
    return f"{seconds * 1000:.2f}ms"


def fmt_passes(passes: tuple[float, float, float] | None) -> str:
    if passes is None:
        return "-"
    return "/".join(f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}" for v in passes)


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def table(rows: list[dict]) -> str:
    header = ["model", "attack", "method", "time", "spread", "n", "bg", "passes g/b/ng", "x floor",
              "x (floor+verif)", "x robustlab", "success", "note"]
    lines = [header]
    for r in rows:
        if r.get("error"):
            lines.append([r["model"], r["attack"], r["method"], "error", "", "", "", "", "", "", "", "", r["error"][:60]])
            continue
        prefix = "≈" if r["scaled_from"] else ""
        lines.append([
            r["model"], r["attack"], r["method"], prefix + fmt_time(r["time_s"]),
            "-" if r["spread"] is None else f"{100 * r['spread']:.0f}%", str(r["runs"]),
            "-" if r.get("background_cores") is None else f"{r['background_cores']:.2f}",
            fmt_passes(r["passes"]), fmt_ratio(r["vs_floor"]), fmt_ratio(r["vs_floor_verified"]),
            fmt_ratio(r["vs_robustlab"]), "-" if r["success"] is None else f"{100 * r['success']:.0f}%",
            r.get("note", ""),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {3, 4, 5, 6, 8, 9, 10, 11}
    out = []
    for j, line in enumerate(lines):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def paired_ratio(a: Method, b: Method, extra_b: float = 0.0) -> float | None:
    """Median over the rounds both were timed in of a / (b + extra_b); ratio of medians otherwise.

    Pairing within a round cancels slow drifts of the machine, which interleaving exposes equally
    to every method of a round.
    """
    if not a.times or not b.times:
        return None
    common = sorted(set(a.rounds) & set(b.rounds))
    if len(common) >= 2:
        return statistics.median(a.rounds[r] / (b.rounds[r] + extra_b) for r in common)
    return statistics.median(a.times) / (statistics.median(b.times) + extra_b)


def rows_for(p: Problem, attack: str, methods: list[Method], ref: dict) -> list[dict]:
    by_name = {m.name: m for m in methods}
    floor = by_name.get("floor")
    rl = by_name.get("robustlab")
    rows = []
    for m in methods:
        row = {"model": p.name, "attack": ATTACK_LABEL[attack], "attack_key": attack, "method": m.name,
               "k": ATTACK_STEPS[attack], "batch": p.batch, "error": m.error, "times_s": m.times,
               "scaled_from": m.scaled_from, "passes": m.passes, "success": m.success,
               "background_cores": m.monitor.cores()}
        t = statistics.median(m.times) if m.times else None
        row["time_s"] = t
        row["runs"] = len(m.times)
        row["spread"] = (max(m.times) - min(m.times)) / t if t and len(m.times) > 1 else None
        row["vs_floor"] = paired_ratio(m, floor) if floor and not m.name.startswith("floor") else None
        row["vs_floor_verified"] = (paired_ratio(m, floor, VERIFICATION_FORWARDS * ref["forward_s"])
                                    if floor and m.name == "robustlab" else None)
        if m.name == "robustlab" and floor and floor.times:
            # The best robustlab/floor possible with its mandatory verification forward.
            row["verification_minimum"] = 1 + VERIFICATION_FORWARDS * ref["forward_s"] / statistics.median(floor.times)
        row["vs_robustlab"] = paired_ratio(m, rl) if rl and m.is_peer else None
        if m.name == "floor (autocast fp16)":
            row["vs_floor"] = None
        row["note"] = ""
        k = ATTACK_STEPS[attack]
        if m.is_peer and m.passes is not None and m.passes[0] < k - 0.5:
            row["note"] = f"stopped after {m.passes[0]:.0f} of {k} steps (no switch to disable it)"
            row["early_stop"] = True
        if m.scaled_from:
            row["note"] = f"timed once at k={m.scaled_from}, scaled to k={k}"
        elif m.max_rounds is not None:
            row["note"] = f"slow: timed in {len(m.times)} round(s) only"
        if m.discarded:
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"{m.discarded} busy call(s) re-run"
        row["discarded"] = m.discarded
        rows.append(row)
    if "floor (autocast fp16)" in by_name and rl is not None:
        amp = by_name["floor (autocast fp16)"]
        for row in rows:
            if row["method"] == "robustlab":
                row["vs_floor_amp"] = paired_ratio(rl, amp)
            if row["method"] == "robustlab (amp)":
                row["vs_floor"] = paired_ratio(by_name["robustlab (amp)"], amp)
                row["note"] = "x floor: vs the autocast floor"
                for other in rows:
                    if other["method"] == "robustlab":
                        other["vs_floor_amp_robustlab_amp"] = row["vs_floor"]
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["attack_key"]), []).append(r)
    for (model, attack), group in groups.items():
        rl = next((r for r in group if r["method"] == "robustlab" and r["time_s"]), None)
        if rl is None:
            continue
        target = TARGETS[attack]
        ratio = rl["vs_floor"]
        met = ratio is not None and ratio <= target
        peers = [r for r in group if r.get("vs_robustlab") and not r.get("early_stop")]
        partial = [r for r in group if r.get("vs_robustlab") and r.get("early_stop")]
        slowest_first = sorted(peers, key=lambda r: r["vs_robustlab"])
        fastest = slowest_first[0] if slowest_first else None
        peer_text = ("no peer measured" if fastest is None else
                     f"fastest peer {fastest['method']} at {fastest['vs_robustlab']:.2f}x robustlab -> "
                     f"{'faster than every peer' if fastest['vs_robustlab'] > 1 else 'NOT faster than every peer'}")
        verified = rl.get("vs_floor_verified")
        amp = f"; robustlab(fp32)/floor(autocast) {rl['vs_floor_amp']:.2f}x" if rl.get("vs_floor_amp") else ""
        if rl.get("vs_floor_amp_robustlab_amp"):
            amp += f"; robustlab(amp=True)/floor(autocast) {rl['vs_floor_amp_robustlab_amp']:.2f}x"
        for r in partial:
            k = ATTACK_STEPS[attack]
            per_step = r["vs_robustlab"] * k / max(r["passes"][0], 1)
            peer_text += (f"; {r['method']} not comparable ({r['note']}; scaled to {k} steps it would be "
                          f"{per_step:.2f}x robustlab)")
        minimum = rl.get("verification_minimum")
        out.append(f"RATIO {model:<7} {ATTACK_LABEL[attack]:<7} robustlab/floor {ratio:.3f}x "
                   f"(target <= {target:.2f}x: {'MET' if met else 'NOT MET'}; "
                   f"the verification forward alone makes it >= {minimum:.3f}x); "
                   f"robustlab/(floor+verification) {verified:.3f}x; {peer_text}{amp}")
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,resnet", help="comma list of: digits, resnet")
    ap.add_argument("--attacks", default="fgsm,pgd,cw", help="comma list of: fgsm, pgd, cw")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma list of: foolbox, torchattacks, art (or none)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--amp", action="store_true", help="with --device cuda: add a floor row under autocast fp16")
    ap.add_argument("--batch-digits", type=int, default=None, help="default 450 (the whole test split); GPU 256")
    ap.add_argument("--batch-resnet", type=int, default=None, help="default 16 on CPU, 256 on GPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per (model, attack); default per cell")
    ap.add_argument("--threads", type=int, default=None, help="torch threads; default: the core count")
    ap.add_argument("--max-run-seconds", type=float, default=60.0,
                    help="a peer whose single call is estimated above this is timed once at fewer iterations "
                         "and scaled linearly (marked ≈)")
    ap.add_argument("--max-cell-seconds", type=float, default=60.0,
                    help="a peer whose calls would take longer than this over all rounds is timed in fewer rounds")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each (model, attack), wait up to this long for other processes to go quiet")
    ap.add_argument("--busy", type=float, default=0.25, metavar="CORES",
                    help="a timed call during which other processes used more CPU cores than this is re-run")
    ap.add_argument("--retries", type=int, default=None,
                    help="re-runs allowed per method and cell for busy calls (default: the number of rounds)")
    ap.add_argument("--no-count", action="store_true", help="do not hook the module to count passes")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, small batches")
    ap.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    attacks = [a.strip().lower() for a in args.attacks.split(",") if a.strip()]
    peers = [] if args.peers.strip().lower() in ("", "none") else [q.strip().lower() for q in args.peers.split(",")]
    for a in attacks:
        if a not in ATTACK_STEPS:
            raise SystemExit(f"unknown attack {a!r}; expected fgsm, pgd, cw")
    for q in peers:
        if q not in PEERS:
            raise SystemExit(f"unknown peer {q!r}; expected {', '.join(PEERS)}")
    for m in models:
        if m not in ("digits", "resnet"):
            raise SystemExit(f"unknown model {m!r}; expected digits, resnet")

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(f"bench/attacks.py: --device {args.device} requested but no CUDA GPU is available "
                  f"(torch {torch.__version__}); nothing to do.")
            return 0
    elif args.device != "cpu":
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    if args.amp and not args.device.startswith("cuda"):
        print("bench/attacks.py: --amp needs --device cuda (robustlab has no AMP path on the CPU); nothing to do.")
        return 0
    device = torch.device(args.device)
    gpu = device.type == "cuda"

    threads = args.threads or core_count()
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("art").setLevel(logging.WARNING)

    batch = {"digits": args.batch_digits or (256 if gpu else 450),
             "resnet": args.batch_resnet or (256 if gpu else 16)}
    if args.quick:
        batch = {"digits": args.batch_digits or 64, "resnet": args.batch_resnet or 4}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    peer_versions, peer_missing = {}, {}
    for q in peers:
        try:
            peer_versions[q] = import_peer(q)[1]
        except Exception as error:  # noqa: BLE001
            peer_missing[q] = f"{type(error).__name__}: {error}".splitlines()[0]

    started = time.perf_counter()
    env = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if gpu else f"{cpu_name()} ({core_count()} cores)",
        "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
        "peers": peer_versions, "peers_missing": peer_missing, "load_average_start": load_average(),
        "quick": args.quick, "batch": {m: batch[m] for m in models},
    }
    env["robustlab"] = robustlab_revision()
    print(f"# robustlab attack benchmark  {env['date']}  device: {env['device']}  torch {torch.__version__}  "
          f"threads {threads}  python {env['python']}  robustlab {env['robustlab']}")
    print("# peers: " + (", ".join(f"{k} {v}" for k, v in peer_versions.items()) or "none")
          + "".join(f"; {k} NOT AVAILABLE ({v})" for k, v in peer_missing.items()))
    env["background_cores_start"] = CpuMonitor.sample(1.0)
    print(f"# load average at start: {env['load_average_start']}; other processes' CPU use now: "
          + ("n/a" if env["background_cores_start"] is None else f"{env['background_cores_start']:.2f} cores"))

    all_rows: list[dict] = []
    references = {}
    for model_name in models:
        p = make_problem(model_name, batch[model_name], device)
        from robustlab.model import ModelUnderTest
        p.mut = ModelUnderTest(p.model, bounds=(0.0, 1.0))
        inspect_s, _ = timed(lambda: p.mut.inspect(p.x), device)  # one-time probe (2 forwards on <= 64 rows)
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle, log)
        ref = reference_times(p, 3 if args.quick else 9, busy=args.busy, retries=0 if args.quick else 30)
        ref["inspect_s"] = inspect_s
        references[model_name] = ref
        print(f"\n## {model_name}: {p.description}; batch {p.batch}; eps {p.eps:.4g} (Linf)")
        print(f"#   one no-grad forward {fmt_time(ref['forward_s'])}  |  one forward+backward (input grads) "
              f"{fmt_time(ref['forward_backward_s'])}  |  forward / (forward+backward) "
              f"{ref['forward_s'] / ref['forward_backward_s']:.2f}  |  one-time ModelUnderTest.inspect "
              f"{fmt_time(inspect_s)}")
        counter = None if args.no_count else PassCounter(p.model)
        for attack in attacks:
            repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS[(model_name, attack)])
            methods = [Method("floor", floor_builder())]
            if args.amp:
                methods.append(Method("floor (autocast fp16)", floor_builder(amp=True)))
            methods.append(Method("robustlab", robustlab_builder(attack)))
            if args.amp and robustlab_supports_amp():
                methods.append(Method("robustlab (amp)", robustlab_builder(attack, amp=True)))
            for q in peers:
                if q in peer_versions:
                    methods.append(Method(q, PEER_BUILDERS[q](attack), is_peer=True))
            if args.wait_idle > 0:
                wait_for_idle(args.wait_idle, log)
            log(f"[{time.perf_counter() - started:6.0f}s] {model_name} {ATTACK_LABEL[attack]} batch {p.batch}, "
                f"{repeats} round(s)")
            bench_attack(p, attack, methods, repeats, counter, args.max_run_seconds, args.max_cell_seconds, log,
                         busy=args.busy, retries=0 if args.quick else (repeats if args.retries is None else args.retries),
                         idle_wait_s=args.wait_idle or 30.0)
            rows = rows_for(p, attack, methods, ref)
            all_rows.extend(rows)
        if counter is not None:
            counter.remove()
        del p

    env["load_average_end"] = load_average()
    env["total_s"] = time.perf_counter() - started
    print()
    print(table(all_rows))
    print()
    print("passes g/b/ng: grad forwards / backwards / no-grad forwards per call, in full-batch units. "
          "x (floor+verif): robustlab time / (floor + the one verification forward it must run). "
          "≈: measured once at fewer iterations, scaled linearly. bg: CPU cores used by other processes "
          "while timing (0 = clean). success: sanity check only.")
    if args.amp:
        print("AMP: only the floor runs under autocast fp16; robustlab (no AMP flag yet) and the peers run in fp32.")
    for line in verdicts(all_rows):
        print(line)
    print(f"# total {env['total_s']:.0f} s; load average at end: {env['load_average_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "references": references, "rows": all_rows}, f, indent=2)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
