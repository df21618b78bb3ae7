"""The attack/evaluation loop: the only place attacks are run (a library: no argparse, no prints).

One split is swept over an ascending eps list, in the spirit of AutoAttack's evaluation:

* classification keeps a per-sample worst case. A sample fooled at a smaller eps stays fooled
  (with the prediction that fooled it) at every larger eps, and only still-robust samples are
  attacked again, which is much faster than attacking everything at every eps;
* segmentation attacks every image at every eps (robustness is per pixel, not per sample);
* a minimum-norm attack (CW) runs once; a sample counts as fooled at eps only if its
  perturbation norm is <= eps, otherwise its clean image is kept for that eps.

Before each (split, eps) row torch is reseeded from (seed, split, eps), and after each row the
per-sample state is saved atomically to ``<state_dir>/<split>.pt``, so a killed sweep resumed
from that state gives bit-identical rows.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from utils import ConfusionMatrix, DataError, ToolError, atomic_torch_save, compute_metrics

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NORM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SweepSpec:
    """What is swept. ``attack_all`` attacks every sample at every eps (a slow reference
    used by the tests to check that attacking only still-robust samples changes nothing)."""

    task: str
    class_names: Sequence[str]
    eps_list: Sequence[float]
    attack: str
    norm: str = "Linf"
    eps_bounded: bool = True
    targeted: bool = False
    seed: int = 0
    examples: int = 4
    fingerprint: str = ""
    attack_all: bool = False


@dataclass
class RowStats:
    """Perturbation statistics of the samples attacked in one row."""

    n_attacked: int = 0
    linf_sum: float = 0.0
    l2_sum: float = 0.0
    linf_max: float = 0.0
    l2_max: float = 0.0
    seconds: float = 0.0

    def add(self, delta: torch.Tensor) -> None:
        flat = delta.detach().flatten(1).double()
        self.add_norms(flat.abs().amax(dim=1), flat.norm(dim=1))

    def add_norms(self, linf: torch.Tensor, l2: torch.Tensor) -> None:
        if len(linf):
            self.n_attacked += len(linf)
            self.linf_sum += linf.sum().item()
            self.l2_sum += l2.sum().item()
            self.linf_max = max(self.linf_max, linf.max().item())
            self.l2_max = max(self.l2_max, l2.max().item())

    def means(self) -> dict:
        """Mean and max norms (the max is the row's visible sanity check against eps)."""
        n = self.n_attacked
        return {"linf_mean": self.linf_sum / n if n else 0.0, "l2_mean": self.l2_sum / n if n else 0.0,
                "linf_max": self.linf_max, "l2_max": self.l2_max}


def row_seed(seed: int, split: str, eps: float) -> int:
    """A seed for one (split, eps) row that does not depend on what ran before it."""
    digest = hashlib.sha256(f"{seed}|{split}|{float(eps)!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def perturbation_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.detach().flatten(1)
    return flat.abs().amax(dim=1) if norm == "Linf" else flat.norm(dim=1)


def check_adversarial(images: torch.Tensor, adv: torch.Tensor, eps: float, norm: str, attack: str) -> None:
    """Refuse a row whose adversarial images leave the threat model (a library bug or misuse)."""
    where = f"attack {attack} at eps {eps:.6g}"
    if not torch.isfinite(adv).all():
        raise ToolError(f"{where} produced NaN/inf pixels; try fewer --steps or another attack")
    if adv.min().item() < 0.0 or adv.max().item() > 1.0:
        raise ToolError(f"{where} produced pixels outside [0, 1] "
                        f"({adv.min().item():.4g}..{adv.max().item():.4g})")
    worst = perturbation_norms(adv - images, norm).max().item() if len(adv) else 0.0
    if worst > eps + NORM_TOLERANCE:
        raise ToolError(f"{where} exceeded its budget: {norm} perturbation {worst:.6g} > eps")


def _batches(loader: Any, device: torch.device):
    """Yield ``(offset, images, targets)`` in loader order (the loader must not shuffle)."""
    offset = 0
    for images, targets in loader:
        yield offset, images.to(device).contiguous(), targets.to(device)
        offset += len(images)


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).argmax(dim=1)


# --------------------------------------------------------------------------- state files
def save_state(path: Path, state: dict) -> None:
    """``torch.save`` into a temporary file, then rename: a kill never leaves half a state."""
    atomic_torch_save(path, state)


def load_state(path: Path, spec: SweepSpec) -> dict | None:
    """The saved state of a split if it belongs to this sweep and its eps are a prefix of ours."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt or foreign state is recomputed, never trusted
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != spec.fingerprint:
        return None
    done = list(state.get("done_eps", []))
    if done != list(spec.eps_list[:len(done)]):
        return None
    return state


# --------------------------------------------------------------------------- rows
def _row_head(spec: SweepSpec, split: str, eps: float, n: int) -> dict:
    return {"split": split, "attack": spec.attack, "eps": float(eps), "n": int(n)}


def _classification_row(spec: SweepSpec, split: str, eps: float, st: dict, stats: RowStats) -> dict:
    cm = ConfusionMatrix(len(spec.class_names))
    cm.update(st["labels"], st["pred"])
    eligible = st["eligible"]
    fooled = eligible & ~st["robust"]
    rate = fooled.sum().item() / eligible.sum().item() if eligible.any() else math.nan
    row = _row_head(spec, split, eps, len(st["labels"]))
    row.update(compute_metrics("classification", cm.mat, spec.class_names))
    row.update({"attack_success_rate": rate, "n_attacked": stats.n_attacked, **stats.means(),
                "seconds": stats.seconds})
    return row


def _record_examples(st: dict, eps: float) -> None:
    ex = st["examples"]
    k = len(ex["label"])
    ex["eps"].append(float(eps))
    ex["adv"].append(st["ex_current"].clone())
    ex["pred"].append(st["pred"][:k].clone() if "pred" in st else st["ex_pred"].clone())


# --------------------------------------------------------------------------- classification
def _clean_state(model: nn.Module, loader: Any, spec: SweepSpec, target_fn, device) -> dict:
    labels, preds, example_images = [], [], []
    for _, images, targets in _batches(loader, device):
        labels.append(targets.cpu())
        preds.append(_predict(model, images).cpu())
        if sum(len(x) for x in example_images) < max(spec.examples, 1):
            example_images.append(images.cpu())
    labels, preds = torch.cat(labels), torch.cat(preds)
    goals = target_fn(labels) if spec.targeted else labels
    k = min(spec.examples, len(labels))
    originals = torch.cat(example_images)[:k]
    clean_correct = preds == labels
    # A targeted sample whose label already is the target cannot be fooled: never attacked.
    eligible = clean_correct & (goals != labels) if spec.targeted else clean_correct
    return {"fingerprint": spec.fingerprint, "done_eps": [], "rows": [], "labels": labels,
            "goals": goals, "pred": preds.clone(), "robust": eligible.clone(), "eligible": eligible,
            "ex_current": originals.clone(),
            "examples": {"original": originals, "label": labels[:k].clone(), "eps": [], "adv": [], "pred": []}}


def _fooled(spec: SweepSpec, pred: torch.Tensor, labels: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
    return pred == goals if spec.targeted else pred != labels


def _attack_robust(model: nn.Module, loader: Any, spec: SweepSpec, st: dict, attack: Attack, eps: float,
                   device, stats: RowStats, desc: str) -> None:
    """Attack the still-robust samples (or all, with ``attack_all``) and update the worst case."""
    robust_before = st["robust"].clone()
    k = len(st["ex_current"])
    for offset, images, _ in tqdm(_batches(loader, device), total=len(loader), desc=desc, leave=False, disable=None):
        idx = torch.arange(offset, offset + len(images))
        chosen = torch.ones_like(idx, dtype=torch.bool) if spec.attack_all else robust_before[idx]
        if not chosen.any():
            continue
        sel, clean = idx[chosen], images[chosen.to(device)]
        adv = attack(clean, st["goals"][sel].to(device)).detach()
        check_adversarial(clean, adv, eps, spec.norm, spec.attack)
        stats.add(adv - clean)
        pred = _predict(model, adv).cpu()
        update = robust_before[sel]
        sel, pred, adv = sel[update], pred[update], adv[update.to(device)].cpu()
        st["pred"][sel] = pred
        st["robust"][sel] = ~_fooled(spec, pred, st["labels"][sel], st["goals"][sel])
        shown = sel < k
        st["ex_current"][sel[shown]] = adv[shown]


def _min_norm_attack(model: nn.Module, loader: Any, spec: SweepSpec, st: dict, attack: Attack,
                     device, desc: str) -> None:
    """Run a minimum-norm attack once on every eligible sample; keep its norm and prediction."""
    n = len(st["labels"])
    st["mn_norm"] = torch.full((n,), math.inf, dtype=torch.float64)
    st["mn_linf"] = torch.zeros(n, dtype=torch.float64)
    st["mn_pred"] = st["pred"].clone()
    st["mn_examples"] = st["ex_current"].clone()
    k = len(st["ex_current"])
    for offset, images, _ in tqdm(_batches(loader, device), total=len(loader), desc=desc, leave=False, disable=None):
        idx = torch.arange(offset, offset + len(images))
        chosen = st["eligible"][idx]
        if not chosen.any():
            continue
        sel, clean = idx[chosen], images[chosen.to(device)]
        adv = attack(clean, st["goals"][sel].to(device)).detach()
        check_adversarial(clean, adv, math.inf, spec.norm, spec.attack)
        pred = _predict(model, adv).cpu()
        success = _fooled(spec, pred, st["labels"][sel], st["goals"][sel])
        delta = (adv - clean).cpu()
        st["mn_norm"][sel] = torch.where(success, perturbation_norms(delta, spec.norm).double(), math.inf)
        st["mn_linf"][sel] = perturbation_norms(delta, "Linf").double()
        st["mn_pred"][sel] = pred
        shown = sel < k
        st["mn_examples"][sel[shown]] = adv.cpu()[shown]


def _apply_min_norm(spec: SweepSpec, st: dict, eps: float, stats: RowStats) -> None:
    """Count a sample as fooled at eps if its minimum-norm perturbation fits in eps."""
    newly = st["robust"] & (st["mn_norm"] <= eps + NORM_TOLERANCE)
    st["pred"][newly] = st["mn_pred"][newly]
    st["robust"][newly] = False
    stats.add_norms(st["mn_linf"][newly], st["mn_norm"][newly])
    k = len(st["ex_current"])
    shown = newly[:k]
    st["ex_current"][shown] = st["mn_examples"][shown]


def _classification_sweep(model, loader, spec, *, split, make_attack, target_fn, device, on_row,
                          state_path, state) -> dict:
    clean_seconds = 0.0
    if state is None:
        start = time.perf_counter()
        state = _clean_state(model, loader, spec, target_fn, device)
        clean_seconds = time.perf_counter() - start
    for eps in spec.eps_list[len(state["done_eps"]):]:
        torch.manual_seed(row_seed(spec.seed, split, eps))
        start = time.perf_counter() - clean_seconds  # the clean pass counts to the first row
        clean_seconds = 0.0
        stats = RowStats()
        desc = f"{split} {spec.attack} eps={eps * 255:.3g}/255"
        if eps > 0 and spec.eps_bounded:
            _attack_robust(model, loader, spec, state, make_attack(eps), eps, device, stats, desc)
        elif eps > 0:
            if "mn_norm" not in state:
                _min_norm_attack(model, loader, spec, state, make_attack(eps), device, desc)
            _apply_min_norm(spec, state, eps, stats)
        stats.seconds = time.perf_counter() - start
        row = _classification_row(spec, split, eps, state, stats)
        _record_examples(state, eps)
        _finish_row(state, row, eps, state_path, on_row)
    return state["examples"]


def _finish_row(state: dict, row: dict, eps: float, state_path: Path | None, on_row) -> None:
    """Save the state (with the row) before reporting it, so no finished row is ever lost."""
    state["done_eps"].append(float(eps))
    state["rows"].append(row)
    if state_path is not None:
        save_state(state_path, state)
    on_row(row)


# --------------------------------------------------------------------------- segmentation
def _segmentation_row(model, loader, spec, *, split, eps, attack, target_fn, device, state) -> dict:
    cm = ConfusionMatrix(len(spec.class_names))
    stats, flipped, pixels, n = RowStats(), 0, 0, 0
    k = len(state["examples"]["label"])
    desc = f"{split} {spec.attack} eps={eps * 255:.3g}/255"
    for offset, images, masks in tqdm(_batches(loader, device), total=len(loader), desc=desc, leave=False,
                                      disable=None):
        clean_pred = _predict(model, images)
        adv, pred = images, clean_pred
        if eps > 0:
            goals = target_fn(masks) if spec.targeted else masks
            adv = attack(images, goals).detach()
            check_adversarial(images, adv, eps, spec.norm, spec.attack)
            stats.add(adv - images)
            pred = _predict(model, adv)
        cm.update(masks, pred)
        flipped += (pred != clean_pred).sum().item()
        pixels += pred.numel()
        n += len(images)
        shown = max(0, min(k - offset, len(images)))
        state["ex_current"][offset:offset + shown] = adv[:shown].cpu()
        state["ex_pred"][offset:offset + shown] = pred[:shown].cpu()
    row = _row_head(spec, split, eps, n)
    row.update(compute_metrics("segmentation", cm.mat, spec.class_names))
    row.update({"flipped_fraction": flipped / pixels if pixels else math.nan, **stats.means()})
    return row


def _segmentation_examples(loader, spec, device) -> dict:
    images, masks = [], []
    for _, batch_images, batch_masks in _batches(loader, device):
        if images and sum(len(x) for x in images) >= spec.examples:
            break
        images.append(batch_images.cpu())
        masks.append(batch_masks.cpu())
    originals, labels = torch.cat(images)[:spec.examples], torch.cat(masks)[:spec.examples]
    return {"fingerprint": spec.fingerprint, "done_eps": [], "rows": [],
            "ex_current": originals.clone(), "ex_pred": labels.clone(),
            "examples": {"original": originals, "label": labels, "eps": [], "adv": [], "pred": []}}


def _segmentation_sweep(model, loader, spec, *, split, make_attack, target_fn, device, on_row,
                        state_path, state) -> dict:
    if state is None:
        state = _segmentation_examples(loader, spec, device)
    for eps in spec.eps_list[len(state["done_eps"]):]:
        torch.manual_seed(row_seed(spec.seed, split, eps))
        start = time.perf_counter()
        attack = make_attack(eps) if eps > 0 else None
        row = _segmentation_row(model, loader, spec, split=split, eps=eps, attack=attack,
                                target_fn=target_fn, device=device, state=state)
        row["seconds"] = time.perf_counter() - start
        _record_examples(state, eps)
        _finish_row(state, row, eps, state_path, on_row)
    return state["examples"]


# --------------------------------------------------------------------------- entry point
def run_split(model: nn.Module, loader: Any, spec: SweepSpec, *, split: str,
              make_attack: Callable[[float], Attack],
              target_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
              device: torch.device | str = "cpu", on_row: Callable[[dict], None] = lambda row: None,
              state_dir: Path | None = None, resume: bool = False) -> dict:
    """Sweep one split over ``spec.eps_list`` (ascending); call ``on_row`` after every row.

    ``make_attack(eps)`` returns ``attack(images, labels) -> adversarial images`` (labels are
    the targets from ``target_fn`` when ``spec.targeted``). With ``resume`` a matching state in
    ``state_dir`` is continued and its finished rows are passed to ``on_row`` again.
    Returns the example images: ``original, label`` and per eps ``eps, adv, pred`` lists.
    """
    if list(spec.eps_list) != sorted(set(spec.eps_list)):
        raise ValueError("eps_list must be ascending without duplicates")
    if spec.targeted and target_fn is None:
        raise ValueError("a targeted sweep needs a target_fn")
    if len(getattr(loader, "dataset", ())) == 0 and hasattr(loader, "dataset"):
        raise DataError(f"split {split} has no samples; check --data, --splits and --limit")
    model.eval()
    device = torch.device(device)
    state_path = Path(state_dir) / f"{split}.pt" if state_dir is not None else None
    state = load_state(state_path, spec) if resume and state_path is not None else None
    for row in (state or {}).get("rows", []):
        on_row(row)
    sweep = _classification_sweep if spec.task == "classification" else _segmentation_sweep
    return sweep(model, loader, spec, split=split, make_attack=make_attack, target_fn=target_fn,
                 device=device, on_row=on_row, state_path=state_path, state=state)
