"""The gradient-masking checklist: is the attack strong enough for its numbers to be believed?

Run after a sweep on a stratified subset of one split (after Carlini et al., "On Evaluating
Adversarial Robustness", 2019, and AutoAttack's ``checks.py``). Each check reports PASS or
WARN with the number behind it; a WARN says what to do. The checks are

a. monotone: the reported metric never rises with eps, nor (classification) the subset's accuracy
   under a PGD run afresh at each eps, by more than one sample;
b. unbounded: at L-inf eps = 1, PGD drives accuracy to <= 1 % (CosPGD drives mean Dice to <= 0.1:
   plain PGD's mean pixel cross-entropy keeps pushing pixels that are already wrong and stalls
   near Dice 0.13-0.15 on a standard UResNet18 even at eps = 1, a property of its loss);
c. iterative beats single-step: PGD is at most FGSM at every swept eps up to 16/255 (for
   classification both as worst cases over the swept eps up to each eps, as the table counts);
d. converged: 5x the steps at the sweep's step size (for classification also APGD-CE with as
   many iterations and 4 random restarts) moves the metric by less than 2 points at the median
   and the largest checked eps;
e. white-box beats black-box: Square (classification, 1000 queries), run on the samples PGD
   left robust at the median eps and at the largest checked eps, fools at most 2 % of the subset;
f. noise: at every checked eps, uniform noise of that eps (the worst of 5 draws per sample) moves
   the metric far less than PGD;
g. gradients: no sample has an input gradient that is exactly zero (segmentation: at most 10 %
   of the pixels have a loss gradient that is exactly zero, i.e. a saturated softmax);
h. the model returns logits (not probabilities), and two forward passes agree.

PGD here is always L-inf ``pgd`` with the sweep's steps and step-size rule; where the sweep
itself ran ``pgd`` on this split, its per-sample results are reused (so check c compares the
reported numbers with FGSM).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks import PGDSpec, build_attack
from dataset import stratified_subset
from engine import Engine, forward, per_sample_noise, predict, predictions_under_attack, row_seed
from splitdata import SplitSource, SubsetSplit
from utils import compute_metrics, per_image_confusion, primary_metric, step_size, worst_case_choice

CHECK_EPS_MAX = 16 / 255
LINF_CHECK_EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
POINTS = 0.02
SQUARE_QUERIES = 1000
RESTARTS = 4
NOISE_DRAWS = 5


@dataclass
class Check:
    """One line of the checklist."""

    id: str
    name: str
    status: str
    value: float | None
    detail: str

    def line(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.4f}"
        return f"check {self.id} {self.name}: {self.status} ({value}) {self.detail}"


@dataclass(frozen=True)
class CheckSettings:
    """The sweep settings the checks follow."""

    task: str
    class_names: Sequence[str]
    eps_list: Sequence[float]
    norm: str = "Linf"
    steps: int = 10
    alpha: float | str | None = None
    random_start: bool = False
    seed: int = 0
    limit: int = 64
    square_queries: int = SQUARE_QUERIES


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "WARN"


class _Subset:
    """The checklist's samples and the attacks it runs on them."""

    def __init__(self, model: nn.Module, source: SplitSource, settings: CheckSettings, engine: Engine,
                 split: str, indices: list[int]) -> None:
        self.model, self.settings, self.engine, self.split = model, settings, engine, split
        self.source = SubsetSplit(source, indices)
        self.indices = indices
        self.classification = settings.task == "classification"
        self.labels, self.clean_pred = self._clean()

    def _clean(self) -> tuple[torch.Tensor, torch.Tensor]:
        targets, preds = [], []
        for chunk in torch.arange(len(self.source)).split(self.engine.batch_size):
            images, target = self.source.batch(chunk, self.engine.device, self.engine.memory_format)
            targets.append(target.cpu())
            preds.append(predict(self.model, images).cpu())
        return torch.cat(targets), torch.cat(preds)

    def metric_of(self, pred: torch.Tensor) -> float:
        if self.classification:
            return (pred == self.labels).double().mean().item()
        return self.metric_of_cms(self.image_cms(pred))

    def image_cms(self, pred: torch.Tensor) -> torch.Tensor:
        """Segmentation: each image's confusion matrix."""
        return per_image_confusion(self.labels, pred, len(self.settings.class_names))

    def metric_of_cms(self, cms: torch.Tensor) -> float:
        return compute_metrics("segmentation", cms.sum(0), self.settings.class_names)["dice_mean"]

    def worst_metric_of_cms(self, cms: Sequence[torch.Tensor]) -> float:
        """Segmentation: the metric of the worst case over several attacks' outcomes."""
        chosen = worst_case_choice(cms)
        return self.metric_of_cms(torch.stack(cms)[chosen, torch.arange(len(chosen))])

    def worst_pred(self, preds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per sample, the worst prediction: a wrong class, or the one that
        :func:`utils.worst_case_choice` takes to lower the split's Dice."""
        if self.classification:
            worst = torch.stack([(pred == self.labels).float() for pred in preds]).argmin(0)
        else:
            num = len(self.settings.class_names)
            worst = worst_case_choice([per_image_confusion(self.labels, pred, num) for pred in preds])
        return torch.stack(preds)[worst, torch.arange(len(worst))]

    def clean_metric(self) -> float:
        return self.metric_of(self.clean_pred)

    def sweep_step(self, eps: float, steps: int | None = None) -> float:
        """The step rule of the sweep at ``eps`` for a PGD of ``steps`` (default: the sweep's):
        its L-inf ``--alpha`` (a step, or a fraction of eps), else 2.5 * eps / steps."""
        s = self.settings
        return step_size(s.alpha if s.norm == "Linf" else None, eps, steps or s.steps)

    def attacked_pred(self, name: str, eps: float, *, steps: int | None = None, random_start: bool | None = None,
                      tag: str = "", only: torch.Tensor | None = None, scaled_step: bool = False,
                      alpha: float | None = None) -> torch.Tensor:
        """Predictions after attack ``name`` (untargeted, L-inf) on the samples ``only``
        (default: all); clean-wrong classification samples are never attacked.

        The step is ``alpha`` where given; else the sweep's ``--alpha`` where it has one for
        L-inf, so checks compare like with like; else, and with ``scaled_step``, 2.5 * eps / steps
        (an L2 sweep's step means nothing in L-inf, and a step sized for the swept eps cannot
        travel to eps = 1).
        """
        s = self.settings
        steps = steps or s.steps
        if alpha is None:
            alpha = step_size(None, eps, steps) if scaled_step else self.sweep_step(eps, steps)
        atk = build_attack(name, self.model, eps, steps=steps, alpha=alpha, num_classes=len(s.class_names),
                           random_start=s.random_start if random_start is None else random_start, seed=s.seed)
        chosen = torch.ones(len(self.source), dtype=torch.bool) if only is None else only
        if self.classification:
            chosen = chosen & (self.clean_pred == self.labels)
        todo = torch.nonzero(chosen).flatten()
        torch.manual_seed(row_seed(s.seed, f"check{tag}/{self.split}", eps, name))  # library attacks' draws
        pred = self.clean_pred.clone()
        pred[todo] = predictions_under_attack(
            self.model, self.source, todo, atk, self.engine, classification=self.classification,
            noise_fn=per_sample_noise(s.seed, f"check{tag}/{self.split}", name)).to(pred.dtype)
        return pred

    def noise_pred(self, eps: float, draws: int = 1) -> torch.Tensor:
        """Predictions under uniform noise of ``eps``: the worst of ``draws`` independent draws
        per sample (random search, as Athalye et al. suggest), chosen as :meth:`worst_pred` does."""
        return self.worst_pred([self._one_noise_pred(eps, k) for k in range(draws)])

    def _one_noise_pred(self, eps: float, draw_index: int) -> torch.Tensor:
        name = f"uniform{draw_index}" if draw_index else "uniform"  # draw 0: the single draw of earlier versions
        draw = per_sample_noise(self.settings.seed, f"noise/{self.split}", name)
        spec = PGDSpec("Linf", eps, 0.0, 0)
        preds = []
        for chunk in torch.arange(len(self.source)).split(self.engine.batch_size):
            images, _ = self.source.batch(chunk, self.engine.device, self.engine.memory_format)
            noisy = (images + draw(chunk, spec, tuple(images.shape[1:])).to(images.device)).clamp(0, 1)
            preds.append(predict(self.model, noisy).cpu())
        return torch.cat(preds).to(self.clean_pred.dtype)


# --------------------------------------------------------------------------- the checks
def check_monotone(rows: Sequence[dict], key: str, fresh: dict[float, float] | None = None, n: int = 0) -> Check:
    """The table's metric never rises with eps; for classification also a fresh PGD per eps
    on the subset (``fresh``), whose accuracy may rise by one sample of ``n`` at most.

    A classification table cannot rise by construction (a sample fooled at a smaller eps
    stays fooled), so on its own it would hide Athalye et al.'s sign of a broken attack:
    more budget, fewer samples fooled. The fresh runs are independent per eps."""
    rise, where = 0.0, ""
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault((row["split"], row["attack"]), []).append(row)
    for (split, attack), chosen in series.items():
        chosen = sorted(chosen, key=lambda r: r["eps"])
        for before, after in zip(chosen, chosen[1:]):
            if before.get(key) is not None and after.get(key) is not None and after[key] - before[key] > rise:
                rise, where = after[key] - before[key], f"{split} {attack} at eps {after['eps']:.4g}"
    fresh_rise, fresh_where = 0.0, ""
    points = sorted((fresh or {}).items())
    for (_, before), (eps, after) in zip(points, points[1:]):
        if after - before > fresh_rise:
            fresh_rise, fresh_where = after - before, f"fresh PGD on the subset at eps {eps * 255:.3g}/255"
    ok = rise <= 1e-12 and fresh_rise <= (1 / n if n else 0.0) + 1e-12
    detail = f"largest rise of {key} with eps in the table"
    if fresh is not None:
        detail += f" and under a fresh PGD per eps on the subset (at most one sample of {n})"
    worst_where = where if rise >= fresh_rise else fresh_where
    detail += f": {worst_where}; more steps or restarts needed" if not ok else ""
    return Check("a", "monotone", _verdict(ok), max(rise, fresh_rise), detail)


def fresh_pgd_metrics(subset: _Subset, eps_values: Sequence[float], pgd: _PGDResults) -> dict[float, float] | None:
    """Classification: the subset's accuracy under a PGD run afresh at each eps (None for
    segmentation, whose table rows are independent per eps already). The checklist's own PGD
    is already fresh where it is not the sweep's, and so is the sweep's at its smallest eps
    (nothing carries forward into it): those runs are reused, not repeated."""
    if not subset.classification:
        return None
    return {eps: pgd(eps) if not pgd.reused(eps) or eps == min(eps_values)
            else subset.metric_of(subset.attacked_pred("pgd", eps, tag="fresh")) for eps in eps_values}


def check_unbounded(subset: _Subset, key: str) -> Check:
    """Classification: PGD at eps = 1. Segmentation: per image the worse of PGD and CosPGD, since
    neither dominates (CosPGD wins on the real UResNet18, PGD on small toy segmenters)."""
    attacks = ("pgd",) if subset.classification else ("pgd", "cospgd")
    value = subset.metric_of(subset.worst_pred([subset.attacked_pred(name, 1.0, scaled_step=True)
                                                for name in attacks]))
    limit = 0.01 if subset.classification else 0.1
    return Check("b", "unbounded budget", _verdict(value <= limit), value,
                 f"{key} under {' + '.join(attacks)} at L-inf eps = 1 (must be <= {limit}); "
                 "otherwise gradients are masked")


def check_single_step(subset: _Subset, eps_values: Sequence[float], pgd: _PGDResults) -> Check:
    """PGD against FGSM at each eps. Classification compares worst cases over the budgets up to
    each eps on both sides: the sweep's PGD carries a sample fooled at a smaller eps forward, so
    FGSM must too, or a PGD that misses what FGSM finds at one eps could pass on the next."""
    if not eps_values:
        return Check("c", "iterative beats single-step", "SKIP", None,
                     f"no swept eps in (0, {CHECK_EPS_MAX * 255:.3g}/255], where PGD-{subset.settings.steps} must "
                     "beat FGSM; add one to --eps-list to run this check")
    gaps, pgd_right, fgsm_right = {}, None, None
    for eps in sorted(eps_values):
        fgsm = subset.attacked_pred("fgsm", eps)
        if not subset.classification:
            gaps[eps] = pgd(eps) - subset.metric_of(fgsm)
            continue
        pgd_now, fgsm_now = pgd.robust(eps), fgsm == subset.labels
        pgd_right = pgd_now if pgd_right is None else pgd_right & pgd_now
        fgsm_right = fgsm_now if fgsm_right is None else fgsm_right & fgsm_now
        gaps[eps] = (pgd_right.double().mean() - fgsm_right.double().mean()).item()
    eps, gap = max(gaps.items(), key=lambda item: item[1])
    each = ", each the worst case over the swept eps up to it," if subset.classification else ""
    return Check("c", "iterative beats single-step", _verdict(gap <= 0.005), gap,
                 f"largest PGD - FGSM over eps <= 16/255{each} (at {eps * 255:.3g}/255); must be <= 0.005")


def check_converged(subset: _Subset, eps_values: Sequence[float], pgd: _PGDResults) -> Check:
    """More effort added to the sweep's own PGD, at the median and the largest checked eps: how far
    their worst case lies below PGD alone. The worst case, not the stronger runs alone, so a sweep
    that is already stronger (a sample fooled at a smaller eps stays fooled) cannot be told to
    raise --steps.

    The longer PGD keeps the sweep's step, so it travels 5 x as far. With the default rule
    (2.5 * eps / steps) at 5 x the steps it took 5 x smaller steps and found little: on the real
    UResNet18 at 8/255 it lowered Dice by 1.4 points where PGD-50 at PGD-10's step lowers it by
    5.9; on the real ResNet18 at 4/255 it fooled none of the 26 images PGD-10 left robust, where
    APGD-CE-50 fooled up to the 5 that AutoAttack fooled. Classification adds, on the samples
    still robust, APGD-CE and random restarts of the longer PGD."""
    steps = 5 * subset.settings.steps
    gap, eps, fooled = max((_convergence_gap(subset, eps, pgd, steps) for eps in eps_values),
                           key=lambda result: result[0])
    where = f"at eps {eps * 255:.3g}/255 (worst of {_eps_list(eps_values)})"
    longer = f"PGD-{steps} at PGD-{subset.settings.steps}'s step"
    rerun = f"sweep again with --steps {steps} --alpha {_same_step_flag(subset.settings)}"
    if fooled is None:
        return Check("d", "converged", _verdict(gap < POINTS), gap,
                     f"PGD-{subset.settings.steps} minus its worst case with {longer} {where}; "
                     f"must be < {POINTS}, else {rerun}")
    advice = (f"quote the worst case of --attack pgd,autoattack (or pgd,apgd with --steps {steps}: "
              f"APGD runs --steps iterations)" if fooled[f"APGD-CE-{steps}"] else rerun)
    found = ", ".join(f"{label} {count}" for label, count in fooled.items())
    return Check("d", "converged", _verdict(gap < POINTS), gap,
                 f"PGD-{subset.settings.steps} minus its worst case with {longer}, APGD-CE-{steps} and "
                 f"{RESTARTS} random restarts {where}; samples each fooled besides: {found}; "
                 f"must be < {POINTS}, else {advice}")


def _same_step_flag(settings: CheckSettings) -> str:
    """The ``--alpha`` that keeps the sweep's L-inf step at every eps with any ``--steps``."""
    if isinstance(settings.alpha, str):
        return settings.alpha
    if settings.alpha is not None and settings.norm == "Linf":
        return f"{settings.alpha * 255:.4g}/255"
    return f"eps/{settings.steps / 2.5:g}"


def _convergence_gap(subset: _Subset, eps: float, pgd: _PGDResults,
                     steps: int) -> tuple[float, float, dict[str, int] | None]:
    """(gap, eps, samples each stronger attack fooled) of check d at one eps (no counts for
    segmentation, whose longer PGD runs on every image)."""
    step = subset.sweep_step(eps)
    if not subset.classification:
        longer = subset.attacked_pred("pgd", eps, steps=steps, tag="x5", alpha=step)
        return pgd(eps) - subset.worst_metric_of_cms([pgd.image_cms(eps), subset.image_cms(longer)]), eps, None
    pred = pgd.pred(eps).clone()
    attempts = [(f"PGD-{steps}", "pgd", False, "x5"), (f"APGD-CE-{steps}", "apgd", None, "apgd"),
                *((f"{RESTARTS} random restarts", "pgd", True, f"restart{r}") for r in range(RESTARTS))]
    fooled: dict[str, int] = {}
    for label, name, random_start, tag in attempts:
        robust = pred == subset.labels
        newly = torch.zeros_like(robust)
        if robust.any():
            again = subset.attacked_pred(name, eps, steps=steps, random_start=random_start, tag=tag, only=robust,
                                         alpha=step)
            newly = (again != subset.labels) & robust
            pred[newly] = again[newly]
        fooled[label] = fooled.get(label, 0) + int(newly.sum())
    return pgd(eps) - subset.metric_of(pred), eps, fooled


def check_black_box(subset: _Subset, eps_values: Sequence[float], pgd: _PGDResults) -> Check:
    """Square only where PGD failed: what it fools there is what the gradient missed. Run at the
    median and at the largest checked eps: a masked model can look robust to both at a small
    eps, where a healthy one is robust too."""
    if not subset.classification:
        return Check("e", "white-box beats black-box", "SKIP", None, "Square is a classification attack")
    queries = subset.settings.square_queries
    results = []
    for eps in eps_values:
        pgd_robust = pgd.robust(eps)
        pred = subset.attacked_pred("square", eps, steps=queries, only=pgd_robust)
        results.append(((pgd_robust & (pred != subset.labels)).double().mean().item(), int(pgd_robust.sum()), eps))
    extra, robust, eps = max(results)  # on a tie, the eps where Square had the most samples to try
    return Check("e", "white-box beats black-box", _verdict(extra <= POINTS), extra,
                 f"share of the subset that Square ({queries} queries) fools among the {robust} samples PGD left "
                 f"robust at eps {eps * 255:.3g}/255 (worst of {_eps_list(eps_values)}); must be <= {POINTS}")


def _eps_list(eps_values: Sequence[float]) -> str:
    return ", ".join(f"{eps * 255:.3g}/255" for eps in eps_values)


def check_noise(subset: _Subset, eps_values: Sequence[float], pgd_metric: Callable[[float], float]) -> Check:
    """Uniform noise against PGD at every checked eps (the largest is where a masked model shows:
    PGD barely moves it while noise does)."""
    clean = subset.clean_metric()
    worst = None
    for eps in eps_values:
        noise_drop = clean - subset.metric_of(subset.noise_pred(eps, NOISE_DRAWS))
        pgd_drop = clean - pgd_metric(eps)
        excess = noise_drop - max(0.5 * pgd_drop, 0.01)
        if worst is None or excess > worst[0]:
            worst = (excess, eps, noise_drop, pgd_drop)
    excess, eps, noise_drop, pgd_drop = worst
    return Check("f", "noise is weaker than PGD", _verdict(excess <= 0), noise_drop,
                 f"drop under uniform noise (worst of {NOISE_DRAWS} draws) at eps {eps * 255:.3g}/255 vs "
                 f"{pgd_drop:.4f} under PGD (the worst of {_eps_list(eps_values)}); must be at most half of it")


SATURATED_PIXELS = 0.1


def check_gradients(subset: _Subset) -> Check:
    """Classification: samples whose input gradient is exactly 0. Segmentation: labelled pixels
    whose loss gradient at the logits is exactly 0 (a saturated softmax). An image's input
    gradient is almost never 0 as a whole, since its few unsaturated pixels reach every input
    pixel, so counting images would pass a segmenter whose softmax saturates on 99 % of its
    pixels (its Dice overstated by 13 points in a helper's test); a trained UResNet18 has none."""
    zero = total = 0
    for chunk in torch.arange(len(subset.source)).split(subset.engine.batch_size):
        images, targets = subset.source.batch(chunk, subset.engine.device, subset.engine.memory_format)
        images.requires_grad_(True)
        logits = forward(subset.model, images).float()
        loss = F.cross_entropy(logits, targets, reduction="sum")
        grad_logits, grad = torch.autograd.grad(loss, [logits, images])
        if subset.classification:
            zero += (grad.flatten(1).abs().amax(1) == 0).sum().item()
            total += len(chunk)
        else:
            zero += (grad_logits.abs().amax(1) == 0).sum().item()
            total += targets.numel()
    fraction = zero / max(total, 1)
    if subset.classification:
        return Check("g", "gradients", _verdict(zero == 0), fraction,
                     "fraction of samples whose input gradient is exactly 0")
    return Check("g", "gradients", _verdict(fraction <= SATURATED_PIXELS), fraction,
                 "fraction of pixels whose loss gradient is exactly 0 (saturated softmax); "
                 f"must be <= {SATURATED_PIXELS}")


@torch.no_grad()
def check_logits(subset: _Subset) -> Check:
    images, _ = subset.source.batch(torch.arange(min(len(subset.source), subset.engine.batch_size)),
                                    subset.engine.device, subset.engine.memory_format)
    first, second = forward(subset.model, images).float(), forward(subset.model, images).float()
    probabilities = bool(first.min() >= 0 and first.max() <= 1 and torch.allclose(first.sum(1), torch.ones_like(first.sum(1)), atol=1e-3))
    diff = ((first - second).abs().max() / first.abs().max().clamp(min=1.0)).item()
    ok = not probabilities and diff <= 1e-5
    detail = ("max difference of two forward passes, relative to the largest logit (if above 1); " +
              ("outputs look like probabilities: return logits" if probabilities else "outputs are logits"))
    return Check("h", "logits and determinism", _verdict(ok), diff, detail)


# --------------------------------------------------------------------------- entry point
def median_eps(eps_list: Sequence[float]) -> float:
    positive = sorted(e for e in eps_list if 0 < e <= 1)
    return positive[(len(positive) - 1) // 2] if positive else 8 / 255


def run_checks(model: nn.Module, source: SplitSource, settings: CheckSettings, engine: Engine, rows: Sequence[dict], *,
               split: str, sweep_state: dict | None = None, on_line: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Run the checklist on a stratified subset of ``source``; returns one dict per check."""
    indices = stratified_subset(range(len(source)), source.labels, settings.limit, settings.seed)
    subset = _Subset(model, source, settings, engine, split, indices)
    key = primary_metric(settings.task)
    linf = [e for e in settings.eps_list if 0 < e <= CHECK_EPS_MAX] if settings.norm == "Linf" else LINF_CHECK_EPS
    middle = median_eps(settings.eps_list if settings.norm == "Linf" else LINF_CHECK_EPS)
    probes = sorted({middle, max(linf, default=middle)})
    pgd_metric = _PGDResults(subset, sweep_state, settings)
    swept = sorted(e for e in settings.eps_list if 0 < e <= 1) if settings.norm == "Linf" else list(LINF_CHECK_EPS)
    results = [check_monotone(rows, key, fresh_pgd_metrics(subset, swept, pgd_metric), len(indices))]
    for make in (lambda: check_unbounded(subset, key), lambda: check_single_step(subset, linf, pgd_metric),
                 lambda: check_converged(subset, probes, pgd_metric),
                 lambda: check_black_box(subset, probes, pgd_metric),
                 lambda: check_noise(subset, linf or [middle], pgd_metric),
                 lambda: check_gradients(subset), lambda: check_logits(subset)):
        results.append(make())
    for check in results:
        on_line(check.line())
    return [asdict(check) for check in results]


class _PGDResults:
    """PGD on the subset at eps: the sweep's own per-sample results where it ran ``pgd`` at
    that eps, else a fresh run (memoised)."""

    def __init__(self, subset: _Subset, sweep_state: dict | None, settings: CheckSettings) -> None:
        self.subset = subset
        self.done = list((sweep_state or {}).get("done_eps", []))
        self.swept = (sweep_state or {}).get("attacks", {}).get("pgd") if settings.norm == "Linf" else None
        self.index = torch.tensor(subset.indices, dtype=torch.long)
        self.preds: dict[float, torch.Tensor] = {}
        self.metrics: dict[float, float] = {}

    def reused(self, eps: float) -> bool:
        return self.swept is not None and eps in self.done

    def pred(self, eps: float) -> torch.Tensor:
        """Per-sample predictions (classification; segmentation where the sweep's are not kept)."""
        if eps not in self.preds:
            if self.reused(eps) and self.subset.classification:
                wrong = self.swept["wrong_eps"][self.index] <= eps
                self.preds[eps] = torch.where(wrong, self.swept["pred"][self.index], self.subset.labels)
            else:
                self.preds[eps] = self.subset.attacked_pred("pgd", eps)
        return self.preds[eps]

    def robust(self, eps: float) -> torch.Tensor:
        return self.pred(eps) == self.subset.labels

    def __call__(self, eps: float) -> float:
        if eps not in self.metrics:
            if self.subset.classification:
                self.metrics[eps] = self.subset.metric_of(self.pred(eps))
            else:
                self.metrics[eps] = self.subset.metric_of_cms(self.image_cms(eps))
        return self.metrics[eps]

    def image_cms(self, eps: float) -> torch.Tensor:
        """Segmentation: each image's confusion matrix under PGD."""
        if self.reused(eps):
            return self.swept["cms"][self.done.index(eps)][self.index]
        return self.subset.image_cms(self.pred(eps))

