"""The per-sample worst case and what it is made of (issue 17, items 3-6): every verified adversarial
example the audit finds counts, at its eps and at every larger one, in every targeted mode.

Each test names the defect it guards against; the figures in the docstrings are today's (before ->
after) on the models of tests/support.py and tests/integrity_zoo.py.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

import robustlab
from robustlab import gates
from robustlab.data import digits_split
from robustlab.integrity import adaptive
from robustlab.integrity.base import CheckResult
from robustlab.model import RobustlabWarning
from robustlab.results import WORST_CASE
import integrity_zoo as zoo
from support import digits_model

pytestmark = pytest.mark.usefixtures("one_thread")


class SinWrapped(nn.Module):
    """x + 1.09 sin(1e4 x) / 1e4 before the CNN: moves each pixel by at most 1.1e-4 (the function is the
    CNN's), but the input gradient is dominated by a 1e4-frequency ripple: gradient attacks are misled."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + 1.09 * torch.sin(1e4 * x) / 1e4)


def sin_wrapped() -> nn.Module:
    model = SinWrapped(copy.deepcopy(digits_model())).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _bounded(samples: pd.DataFrame) -> pd.DataFrame:
    return samples[samples["eps"].notna()]


def _per_sample(samples: pd.DataFrame, *, mode: str = "none", attacks=None) -> pd.DataFrame:
    """(sample x eps) robust, from the worst-case rows of one targeted mode."""
    rows = _bounded(samples)
    rows = rows[(rows["targeted"] == mode) & (rows["attack"] == WORST_CASE)]
    return rows.groupby(["sample", "eps"])["robust"].all().unstack("eps")


# ---------------------------------------------------------------------------- 3: probes wherever a gate can read
def test_gradient_obfuscated_model_cannot_pass_a_gate_on_pgd_alone():
    """A gradient-obfuscating wrapper, PGD only, eps 0.2: PGD's 0.48 is under half the clean accuracy
    ("not robust"), so the probes were skipped and a 0.3 gate passed; Square breaks all but 1 of 200.
    Before: gate passed on 0.48. After: the black-box probe runs, fails, the published Square follows,
    and the worst case is 0.0."""
    data = digits_split("test").head(200)
    result = robustlab.audit(sin_wrapped(), data, attacks=["pgd"], suite="none", eps=0.2, progress=False)
    with pytest.raises(gates.RobustnessGateError):
        robustlab.assert_robust(result, min_accuracy=0.3)
    black_box = next(c for c in result.metadata["checks"]["results"] if c["check"] == "black-box")
    assert black_box["status"] == "fail", black_box
    assert result.robust_accuracy(eps=0.2) < 0.1


# ---------------------------------------------------------------------------- 4: nested balls
def test_worst_case_is_monotone_in_eps_for_every_sample():
    """A sample broken at eps is broken at every larger eps of the same norm. The quantised CNN (gradients
    masked, attacks erratic) has a sample FGSM and PGD-1 break at eps 0.15 but not at 0.2: it was counted
    robust at 0.2. Before: 1 of 200 samples non-monotone, no per-sample worst case in samples.csv. After:
    0, and the worst-case rows are the running AND over every row at that eps and every smaller one."""
    data = digits_split("test").head(200)
    eps = (0.05, 0.1, 0.15, 0.2, 0.3)
    result = robustlab.audit(zoo.quantised(), data, attacks=("fgsm", "pgd"), steps=1, suite="none", eps=eps,
                             checks="none", progress=False)
    worst = _per_sample(result.samples)
    assert list(worst.columns) == list(eps) and len(worst) == len(data.y)
    for lo, hi in zip(eps, eps[1:]):
        assert not (~worst[lo] & worst[hi]).any(), f"samples broken at {lo} but robust at {hi}"
    # the worst-case rows are made of every attack row at that eps and every smaller one
    attacks = _bounded(result.samples)
    attacks = attacks[attacks["attack"] != WORST_CASE]
    raw = attacks.groupby(["sample", "eps"])["robust"].all().unstack("eps")
    assert (~raw[0.15] & raw[0.2]).any(), "the scenario lost the sample it guards"
    carried = raw.cummin(axis=1).astype(bool)
    pd.testing.assert_frame_equal(worst, carried, check_names=False)
    figures = [result.robust_accuracy(eps=e) for e in eps]
    assert figures == sorted(figures, reverse=True)
    assert figures == pytest.approx([float(worst[e].mean()) for e in eps])


def test_adaptive_attacks_run_at_every_eps_at_or_above_the_failing_one():
    """A check failing at eps 0.1 called its adaptive attack at 0.1 only; the 0.2 ball holds the 0.1 ball.
    Before: pgd-strong / square at [0.1]. After: at [0.1, 0.2]."""
    ctx = SimpleNamespace(mut=SimpleNamespace(name="m"), eps=[0.05, 0.1, 0.2], norm="linf", attack=lambda name: None,
                          surrogate=None)
    failed = [CheckResult(model="m", check="convergence", status="fail", norm="linf", eps=0.1, targeted="none"),
              CheckResult(model="m", check="black-box", status="fail", norm="linf", eps=0.1, targeted="none",
                          evidence={"failed_by": ["square"]})]
    extras, _ = adaptive.plan(ctx, failed)
    by_label = {e.label: e for e in extras}
    assert by_label["pgd-strong"].eps == [0.1, 0.2]
    assert by_label["square"].eps == [0.1, 0.2]
    square = by_label["square"].attack  # the published Square decides the figure where a check failed
    assert (square.queries, square.p_init, square.rescale) == (5000, 0.8, False)


def test_published_square_schedule_is_autoattacks():
    """AutoAttack's standard Square: 5000 queries, p_init 0.8, p halved at fixed iterations (resc_schedule
    False). Before: only the schedule rescaled to the query budget existed (p_init 0.05, 1000 queries)."""
    from robustlab.attacks.square import PUBLISHED, p_selection

    def reference(p_init: float, it: int) -> float:  # fra31/auto-attack, autoattack/square.py, p_selection
        for lo, hi, d in ((10, 50, 2), (50, 200, 4), (200, 500, 8), (500, 1000, 16), (1000, 2000, 32),
                          (2000, 4000, 64), (4000, 6000, 128), (6000, 8000, 256)):
            if lo < it <= hi:
                return p_init / d
        return p_init / 512 if it > 8000 else p_init

    for it in range(0, 12000, 7):
        assert p_selection(0.8, it, 5000, rescale=False) == reference(0.8, it)
    assert PUBLISHED == {"queries": 5000, "p_init": 0.8, "rescale": False}


# ---------------------------------------------------------------------------- 5: probes' adversarials are kept
def test_probe_adversarials_are_rows_of_their_own_and_lower_the_worst_case(tmp_path):
    """The probes' verified adversarial examples were counted, then thrown away. PGD-1 on the PGD-trained
    CNN, eps 0.1, 200 samples: the stronger-PGD probe breaks some of the 64 rows it draws from the 160 every
    attack left robust (2 on AMD EPYC). Before: no probe rows, worst case 0.80. After: probe:* rows
    in samples.csv, and a worst case (0.79) lower by exactly the rows only a probe broke."""
    data = digits_split("test").head(200)
    result = robustlab.audit(zoo.pgd_trained(), data, attacks=("fgsm", "pgd"), steps=1, suite="none", eps=(0.1,),
                             progress=False)
    convergence = next(c for c in result.metadata["checks"]["results"] if c["check"] == "convergence")
    # the probe must break something; whether that many breaks fail the check depends on the model, which
    # training makes slightly different on different CPUs (pass on AMD EPYC, fail on Intel Xeon)
    assert convergence["evidence"]["broken"] > 0, convergence
    result.save(tmp_path / "r")
    samples = robustlab.load(tmp_path / "r").samples
    at = _bounded(samples)
    probes = at[at["attack"].str.startswith("probe:")]
    assert {"probe:pgd-strong", "probe:square", "probe:unbounded"} <= set(probes["attack"])
    assert probes["attacked"].any() and (probes.loc[probes["attacked"], "clean_correct"]).all()
    others = at[~at["attack"].str.startswith("probe:") & (at["attack"] != WORST_CASE)]
    robust_elsewhere = others.groupby("sample")["robust"].all()
    broken_by_probe = probes.groupby("sample")["robust"].all().eq(False)
    only_probe = robust_elsewhere & broken_by_probe.reindex(robust_elsewhere.index, fill_value=False)
    if convergence["status"] == "pass":  # a failed check runs the adaptive attacks, which may break them too
        assert only_probe.any(), "the scenario lost the rows only a probe breaks"
    worst = result.robust_accuracy(eps=0.1)
    assert worst == pytest.approx(float(robust_elsewhere.mean()) - float(only_probe.mean()))
    worst_rows = at[at["attack"] == WORST_CASE].set_index("sample")
    assert not worst_rows.loc[only_probe[only_probe].index, "robust"].any()


# ---------------------------------------------------------------------------- 6: targeted rows, gates
def test_targeted_successes_join_the_untargeted_worst_case():
    """A targeted success is a misclassification (AutoAttack counts APGD-T's). FGSM and PGD, untargeted
    and toward every other class, eps 0.1, 100 samples. Before: untargeted worst case 0.43, 4 samples
    broken only by targeted rows. After: 0.39, none."""
    data = digits_split("test").head(100)
    result = robustlab.audit(zoo.plain(), data, attacks=("fgsm", "pgd"), suite="none", eps=(0.1,),
                             targeted=["none", "all"], checks="none", progress=False)
    at = _bounded(result.samples)
    attacks = at[at["attack"] != WORST_CASE]
    untargeted = attacks[attacks["targeted"] == "none"].groupby("sample")["robust"].all()
    everything = attacks.groupby("sample")["robust"].all()
    assert (untargeted & ~everything).any(), "the scenario lost the samples only targeted rows break"
    assert result.robust_accuracy(eps=0.1) == pytest.approx(float(everything.mean()))
    worst = _per_sample(result.samples)[0.1]
    pd.testing.assert_series_equal(worst, everything, check_names=False)
    # the targeted worst case is unchanged: untargeted successes do not reach a target
    targeted = attacks[attacks["targeted"] == "all"].groupby("sample")["robust"].all()
    assert result.robust_accuracy(eps=0.1, targeted="all") == pytest.approx(float(targeted.mean()))


def test_fixed_target_class_samples_are_not_counted_robust():
    """targeted="3": samples of class 3 cannot be attacked toward their own label, yet counted robust.
    Before: n=100, worst case 0.74. After: n=93 (class 3 excluded, said in the row's note), 0.72."""
    data = digits_split("test").head(100)
    result = robustlab.audit(zoo.plain(), data, attacks=("fgsm", "pgd"), suite="none", eps=(0.1,), targeted="3",
                             checks="none", progress=False)
    s = result.summary
    excluded = int((data.y == 3).sum())
    for _, row in s[s["targeted"] == "3"].iterrows():
        assert row["n"] == len(data.y) - excluded
        assert f"{excluded} samples of class 3" in row["note"]
    rows = _bounded(result.samples)
    eligible = rows[(rows["attack"] == WORST_CASE) & (rows["label"] != 3)]
    assert result.robust_accuracy(eps=0.1, targeted="3") == pytest.approx(float(eligible["robust"].mean()))


def test_gates_default_to_the_worst_case_and_a_lone_attack_is_its_own_worst_case():
    """robustlab.assert_robust reads the worst case; with one attack at one eps and no checks there is no
    worst-case row, and that attack's row is the worst case (before: an InputError)."""
    data = digits_split("test").head(40)
    result = robustlab.audit(zoo.plain(), data, attacks=("pgd",), suite="none", eps=(0.05,), checks="none",
                             progress=False)
    assert WORST_CASE not in set(result.summary["attack"])
    [check] = gates.evaluate_robust(result, eps=0.05, min_accuracy=0.0)
    assert check.attack == "pgd" and check.measured == result.robust_accuracy(attack="pgd", eps=0.05)
