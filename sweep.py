"""Sweep one split over an ascending eps list and one or more attacks (AutoAttack-style).

Attacks are run by ``engine.run_attack``; this module decides which samples to attack and
counts the outcome:

* classification keeps a per-sample worst case for each attack: a sample wrong at a smaller
  eps stays wrong (with the prediction that made it wrong) at every larger eps, and only
  samples not yet fooled are attacked again. Targeted sweeps keep that accuracy worst case
  apart from the target success (a sample keeps being attacked until it hits the target);
* segmentation attacks every image at every eps (robustness is per pixel);
* several attacks add a ``worst`` row: a classification sample is robust only if it survives
  every attack; a segmentation image keeps the attack chosen to lower the split's pooled mean
  Dice (``utils.worst_case_choice``) and the metrics are recomputed from those images;
* a minimum-norm attack (CW) runs once; a sample counts as fooled at eps only if its
  perturbation norm is <= eps.

Before each (split, eps, attack) row torch is reseeded from them (library attacks draw from
the global stream; the fast engine draws per sample), and after each eps the per-sample
state is saved atomically to ``<state_dir>/<split>.pt``, so a killed sweep resumed from that
state gives bit-identical rows.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from attacks import Attack
from distributed import Dist
from engine import (NORM_TOLERANCE, Engine, Finished, FirstSteps, check_adversarial, per_sample_noise,
                    perturbation_norms, predict, row_seed, run_attack)
from files import atomic_torch_save
from outcomes import RowStats, example_indices, example_slots, merge_examples
from splitdata import SplitSource
from stats import metric_interval
from utils import ConfusionMatrix, DataError, compute_metrics, per_image_confusion, worst_case_choice

WORST = "worst"
WORST_CASE_RULE = ("classification: robust only if every attack failed; segmentation: per image "
                   "the attack whose adversarial lowers the split's mean Dice (utils.worst_case_choice)")


@dataclass(frozen=True)
class SweepSpec:
    """What is swept. ``attack_all`` attacks every eligible sample at every eps (a slow
    reference used by the tests to check that attacking only robust samples changes nothing)."""

    task: str
    class_names: Sequence[str]
    eps_list: Sequence[float]
    attacks: Sequence[str] = ("pgd",)
    norm: str = "Linf"
    min_norm: Sequence[str] = ()
    targeted: bool = False
    seed: int = 0
    examples: int = 4
    fingerprint: str = ""
    attack_all: bool = False


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
    if done != [float(e) for e in spec.eps_list[:len(done)]]:
        return None
    return state


# --------------------------------------------------------------------------- the per-split loop
class _SplitSweep:
    """The eps loop shared by both tasks; subclasses attack, count and choose the worst case."""

    def __init__(self, model: nn.Module, source: SplitSource, spec: SweepSpec, engine: Engine, *, split: str,
                 make_attack: Callable[[str, float], Attack], target_fn, on_row, state_path: Path | None,
                 dist: Dist, offset: int) -> None:
        self.model, self.source, self.spec, self.engine, self.split = model, source, spec, engine, split
        self.make_attack, self.on_row, self.state_path = make_attack, on_row, state_path
        self.dist, self.offset = dist, offset
        self.target_fn = target_fn if spec.targeted else (lambda targets: targets)
        self.first_steps = {name: FirstSteps(len(source)) for name in spec.attacks} if source.in_memory else {}

    def run(self, state: dict | None) -> dict:
        first_extra = 0.0
        if state is None:
            start = time.perf_counter()
            state = self.initial_state()
            first_extra = time.perf_counter() - start  # the clean pass counts to the first row
        for eps in self.spec.eps_list[len(state["done_eps"]):]:
            rows = self.sweep_eps(state, float(eps))
            rows[0]["seconds"] += first_extra
            first_extra = 0.0
            state["done_eps"].append(float(eps))
            state["rows"].extend(rows)
            if self.state_path is not None:
                save_state(self.state_path, state)
            for row in rows:
                self.on_row(row)
        return state

    def new_state(self, labels: torch.Tensor, allowed: torch.Tensor, caption: str) -> dict:
        """A fresh state; the examples are chosen over the whole split (all ranks' shards)."""
        everything = self.dist.gather((labels, allowed))
        chosen = example_indices(torch.cat([part[0] for part in everything]),
                                 torch.cat([part[1] for part in everything]), self.spec.examples)
        mine = chosen[(chosen >= self.offset) & (chosen < self.offset + len(labels))]
        ex_index = mine - self.offset
        originals, targets = self.source.batch(ex_index, torch.device("cpu"))
        return {"fingerprint": self.spec.fingerprint, "done_eps": [], "rows": [], "ex_index": ex_index,
                "examples": {"original": originals, "label": targets, "eps": [], "adv": [], "pred": [],
                             "caption": caption, "class": labels[ex_index], "index": mine}}

    def timed_attacks(self, state: dict, eps: float, attack_one) -> dict[str, RowStats]:
        """Run ``attack_one(name, stats)`` for every attack, each from its own row seed."""
        stats = {}
        for name in self.spec.attacks:
            torch.manual_seed(row_seed(self.spec.seed, self.split, eps, name))  # library attacks' draws
            stats[name] = RowStats()
            start = time.perf_counter()
            if eps > 0:
                attack_one(name, stats[name])
            stats[name].seconds = time.perf_counter() - start
        return stats

    def attack(self, name: str, eps: float, index: torch.Tensor, emit, fooled_fn=None) -> None:
        atk = self.make_attack(name, eps)
        label = f"{eps * 255:.3g}/255" if self.spec.norm == "Linf" else f"{eps:.3g}"
        with tqdm(total=len(index), desc=f"{self.split} {name} eps={label}", leave=False, disable=None) as bar:
            def counted(done: Finished) -> None:
                emit(done)
                bar.update(len(done.index))

            run_attack(self.model, self.source, index, atk, self.engine, goal_fn=self.target_fn, emit=counted,
                       fooled_fn=fooled_fn, noise_fn=per_sample_noise(self.spec.seed, self.split, name, self.offset),
                       first_steps=self.first_steps.get(name))

    def head(self, attack: str, eps: float) -> dict:
        return {"split": self.split, "attack": attack, "eps": eps, "n": int(self.dist.sum_float(len(self.source)))}

    def worst_stats(self, stats: dict[str, RowStats]) -> RowStats:
        merged = RowStats()
        for one in stats.values():
            merged.merge(one)
        return merged

    def counts(self, *values: float) -> list[float]:
        """Counts summed over the ranks' shards."""
        return self.dist.sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def record_examples(self, state: dict, eps: float, adv: torch.Tensor, pred: torch.Tensor) -> None:
        examples = state["examples"]
        examples["eps"].append(eps)
        examples["adv"].append(adv.clone())
        examples["pred"].append(pred.clone())


class _ClassificationSweep(_SplitSweep):
    def initial_state(self) -> dict:
        labels, preds = [], []
        for chunk in torch.arange(len(self.source)).split(self.engine.batch_size):
            images, targets = self.source.batch(chunk, self.engine.device, self.engine.memory_format)
            labels.append(targets.cpu())
            preds.append(predict(self.model, images).cpu())
        labels, clean_pred = torch.cat(labels), torch.cat(preds)
        goals = self.target_fn(labels) if self.spec.targeted else labels
        # A targeted sample whose label already is the target cannot be fooled: never attacked.
        eligible = (clean_pred == labels) & ((goals != labels) if self.spec.targeted else True)
        state = self.new_state(labels, eligible, "the first clean-correct samples of each class in turn")
        originals = state["examples"]["original"]
        state.update(labels=labels, goals=goals, clean_pred=clean_pred, eligible=eligible, attacks={
            name: {"wrong_eps": torch.where(clean_pred == labels, math.inf, 0.0).double(),
                   "pred": clean_pred.clone(), "hit": torch.zeros(len(labels), dtype=torch.bool),
                   "ex_adv": originals.clone(), "ex_pred": clean_pred[state["ex_index"]].clone()}
            for name in self.spec.attacks})
        return state

    def sweep_eps(self, state: dict, eps: float) -> list[dict]:
        def attack_one(name: str, stats: RowStats) -> None:
            if name in self.spec.min_norm:
                self.apply_min_norm(state, name, eps, stats)
            else:
                self.attack_robust(state, name, eps, stats)

        stats = self.timed_attacks(state, eps, attack_one)
        rows = [self.row(state, name, eps, state["attacks"][name], stats[name]) for name in self.spec.attacks]
        worst = self.worst_case(state)
        if len(self.spec.attacks) > 1:
            rows.append(self.row(state, WORST, eps, worst, self.worst_stats(stats)))
        chosen = worst["chosen"][state["ex_index"]].tolist()
        adv = [state["attacks"][self.spec.attacks[c]]["ex_adv"][k] for k, c in enumerate(chosen)]
        adv = torch.stack(adv) if adv else state["examples"]["original"]
        pred = [state["attacks"][self.spec.attacks[c]]["ex_pred"][k] for k, c in enumerate(chosen)]
        self.record_examples(state, eps, adv, torch.stack(pred) if pred else worst["pred"][state["ex_index"]])
        return rows

    def todo(self, state: dict, per_attack: dict) -> torch.Tensor:
        """The samples to attack: eligible ones not yet fooled (every eligible with ``attack_all``)."""
        if self.spec.attack_all:
            return state["eligible"]
        done = per_attack["hit"] if self.spec.targeted else torch.isfinite(per_attack["wrong_eps"])
        return state["eligible"] & ~done

    def fooled(self, pred: torch.Tensor, targets: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
        return pred == goals if self.spec.targeted else pred != targets

    def count(self, state: dict, per_attack: dict, index: torch.Tensor, pred: torch.Tensor, eps: float) -> None:
        """File the predictions of attacked samples: the first wrong one is kept for good."""
        newly_wrong = (pred != state["labels"][index]) & ~torch.isfinite(per_attack["wrong_eps"][index])
        per_attack["wrong_eps"][index[newly_wrong]] = eps
        per_attack["pred"][index[newly_wrong]] = pred[newly_wrong]
        if self.spec.targeted:
            per_attack["hit"][index] |= pred == state["goals"][index]

    def attack_robust(self, state: dict, name: str, eps: float, stats: RowStats) -> None:
        per_attack = state["attacks"][name]
        slots = example_slots(len(self.source), state["ex_index"])

        def emit(done: Finished) -> None:
            check_adversarial(done.clean, done.adv, eps, self.spec.norm, name)
            delta = done.adv - done.clean
            stats.add_norms(perturbation_norms(delta, "Linf").cpu(), perturbation_norms(delta, "L2").cpu())
            self.count(state, per_attack, done.index, done.pred.cpu(), eps)
            shown = slots[done.index]
            per_attack["ex_adv"][shown[shown >= 0]] = done.adv[(shown >= 0).to(done.adv.device)].float().cpu()
            per_attack["ex_pred"][shown[shown >= 0]] = done.pred.cpu()[shown >= 0]  # the shown image's own

        index = torch.nonzero(self.todo(state, per_attack)).flatten()
        self.attack(name, eps, index, emit, fooled_fn=self.fooled)

    def apply_min_norm(self, state: dict, name: str, eps: float, stats: RowStats) -> None:
        """A minimum-norm attack runs once; a sample is fooled at eps if its norm fits in eps."""
        per_attack = state["attacks"][name]
        if "mn_norm" not in per_attack:
            self.run_min_norm(state, name, eps)
        newly = self.todo(state, per_attack) & (per_attack["mn_norm"] <= eps + NORM_TOLERANCE)
        index = torch.nonzero(newly).flatten()
        self.count(state, per_attack, index, per_attack["mn_pred"][index], eps)
        stats.add_norms(per_attack["mn_linf"][index], per_attack["mn_l2"][index])
        shown = example_slots(len(self.source), state["ex_index"])[index]
        per_attack["ex_adv"][shown[shown >= 0]] = per_attack["mn_ex"][shown[shown >= 0]]
        per_attack["ex_pred"][shown[shown >= 0]] = per_attack["mn_pred"][index][shown >= 0]

    def run_min_norm(self, state: dict, name: str, eps: float) -> None:
        n = len(self.source)
        per_attack = state["attacks"][name]
        per_attack.update(mn_norm=torch.full((n,), math.inf, dtype=torch.float64),
                          mn_linf=torch.zeros(n, dtype=torch.float64), mn_l2=torch.zeros(n, dtype=torch.float64),
                          mn_pred=state["clean_pred"].clone(), mn_ex=per_attack["ex_adv"].clone())
        slots = example_slots(n, state["ex_index"])

        def emit(done: Finished) -> None:
            check_adversarial(done.clean, done.adv, math.inf, self.spec.norm, name)
            delta, pred, index = (done.adv - done.clean).cpu(), done.pred.cpu(), done.index
            success = self.fooled(pred, state["labels"][index], state["goals"][index])
            own_norm = perturbation_norms(delta, self.spec.norm).double()
            per_attack["mn_norm"][index] = torch.where(success, own_norm, math.inf)
            per_attack["mn_linf"][index] = perturbation_norms(delta, "Linf").double()
            per_attack["mn_l2"][index] = perturbation_norms(delta, "L2").double()
            per_attack["mn_pred"][index] = pred
            shown = slots[index]
            per_attack["mn_ex"][shown[shown >= 0]] = done.adv.cpu()[shown >= 0]

        self.attack(name, eps, torch.nonzero(state["eligible"]).flatten(), emit)

    def worst_case(self, state: dict) -> dict:
        """Per sample, the attack that made it wrong first (the first attack listed on ties)."""
        names = self.spec.attacks
        first = state["attacks"][names[0]]
        worst = {"wrong_eps": first["wrong_eps"].clone(), "pred": first["pred"].clone(), "hit": first["hit"].clone(),
                 "chosen": torch.zeros(len(first["pred"]), dtype=torch.long)}
        for position, name in enumerate(names[1:], start=1):
            other = state["attacks"][name]
            better = other["wrong_eps"] < worst["wrong_eps"]
            worst["wrong_eps"][better] = other["wrong_eps"][better]
            worst["pred"][better] = other["pred"][better]
            worst["chosen"][better] = position
            worst["hit"] |= other["hit"]
        return worst

    def row(self, state: dict, name: str, eps: float, outcome: dict, stats: RowStats) -> dict:
        cm = ConfusionMatrix(len(self.spec.class_names))
        cm.update(state["labels"], outcome["pred"])
        eligible = state["eligible"]
        success = outcome["hit"] if self.spec.targeted else torch.isfinite(outcome["wrong_eps"])
        n_eligible, n_success = self.counts(eligible.sum().item(), (eligible & success).sum().item())
        stats = stats.reduced(self.dist)
        row, split_cm = self.head(name, eps), self.dist.sum(cm.mat)
        row.update(compute_metrics("classification", split_cm, self.spec.class_names))
        row.update(metric_interval("classification", split_cm))
        row.update({"attack_success_rate": n_success / n_eligible if n_eligible else math.nan, **stats.means(),
                    "seconds": stats.seconds})
        return row


# --------------------------------------------------------------------------- segmentation
class _SegmentationSweep(_SplitSweep):
    def initial_state(self) -> dict:
        num_classes = len(self.spec.class_names)
        preds, cms = [], []
        for chunk in torch.arange(len(self.source)).split(self.engine.batch_size):
            images, masks = self.source.batch(chunk, self.engine.device, self.engine.memory_format)
            pred = predict(self.model, images)
            preds.append(pred.to(torch.uint8).cpu())
            cms.append(per_image_confusion(masks, pred, num_classes))
        labels = torch.tensor(self.source.labels, dtype=torch.long)
        state = self.new_state(labels, torch.ones(len(labels), dtype=torch.bool), "the first image of each class in turn")
        state.update(clean_pred=torch.cat(preds), clean_cm=torch.cat(cms),
                     attacks={name: {"cms": [], "flipped": []} for name in self.spec.attacks})
        return state

    def sweep_eps(self, state: dict, eps: float) -> list[dict]:
        n, k = len(self.source), len(state["ex_index"])
        outcome = {name: {"cm": state["clean_cm"], "flipped": torch.zeros(n, dtype=torch.long),
                          "linf": torch.zeros(n, dtype=torch.float64), "l2": torch.zeros(n, dtype=torch.float64),
                          "ex_adv": state["examples"]["original"].clone(),
                          "ex_pred": state["clean_pred"][state["ex_index"]].long()} for name in self.spec.attacks}

        def attack_one(name: str, stats: RowStats) -> None:
            self.attack_all_images(state, eps, name, outcome[name], stats)

        stats = self.timed_attacks(state, eps, attack_one)
        rows = []
        for name in self.spec.attacks:
            state["attacks"][name]["cms"].append(outcome[name]["cm"])
            state["attacks"][name]["flipped"].append(outcome[name]["flipped"])
            rows.append(self.row(state, name, eps, outcome[name]["cm"], outcome[name]["flipped"], stats[name]))
        chosen = torch.zeros(n, dtype=torch.long)
        if len(self.spec.attacks) > 1:
            chosen = self.worst_choice([outcome[name]["cm"] for name in self.spec.attacks])
            rows.append(self.worst_row(state, eps, outcome, chosen, stats))
        shown = [outcome[self.spec.attacks[c]] for c in chosen[state["ex_index"]].tolist()]
        adv = torch.stack([o["ex_adv"][i] for i, o in enumerate(shown)]) if k else state["examples"]["original"]
        pred = torch.stack([o["ex_pred"][i] for i, o in enumerate(shown)]) if k else state["examples"]["label"]
        self.record_examples(state, eps, adv, pred)
        return rows

    def attack_all_images(self, state: dict, eps: float, name: str, outcome: dict, stats: RowStats) -> None:
        num_classes = len(self.spec.class_names)
        cm = torch.zeros_like(state["clean_cm"])
        slots = example_slots(len(self.source), state["ex_index"])

        def emit(done: Finished) -> None:
            check_adversarial(done.clean, done.adv, eps, self.spec.norm, name)
            delta, index = done.adv - done.clean, done.index
            linf, l2 = perturbation_norms(delta, "Linf").double().cpu(), perturbation_norms(delta, "L2").double().cpu()
            stats.add_norms(linf, l2)
            outcome["linf"][index], outcome["l2"][index] = linf, l2
            cm[index] = per_image_confusion(done.targets, done.pred, num_classes)
            clean = state["clean_pred"][index].to(done.pred.device).long()
            outcome["flipped"][index] = (done.pred != clean).flatten(1).sum(1).cpu()
            shown = slots[index]
            on_device = (shown >= 0).to(done.adv.device)
            outcome["ex_adv"][shown[shown >= 0]] = done.adv[on_device].float().cpu()
            outcome["ex_pred"][shown[shown >= 0]] = done.pred[on_device].cpu()

        self.attack(name, eps, torch.arange(len(self.source)), emit)
        outcome["cm"] = cm

    def worst_choice(self, cms: list[torch.Tensor]) -> torch.Tensor:
        """This shard's part of the worst-case choice, made over the whole split (every rank
        makes the same one), so the table does not depend on the number of processes."""
        parts = self.dist.gather(cms)
        whole = [torch.cat([part[a] for part in parts]) for a in range(len(cms))]
        return worst_case_choice(whole)[self.offset:self.offset + len(self.source)]

    def worst_row(self, state: dict, eps: float, outcome: dict, chosen: torch.Tensor,
                  stats: dict[str, RowStats]) -> dict:
        per_attack = [outcome[name] for name in self.spec.attacks]
        pick = lambda key: torch.stack([o[key] for o in per_attack])[chosen, torch.arange(len(chosen))]  # noqa: E731
        worst_stats = RowStats(seconds=sum(s.seconds for s in stats.values()))
        if eps > 0:
            worst_stats.add_norms(pick("linf"), pick("l2"))
        return self.row(state, WORST, eps, pick("cm"), pick("flipped"), worst_stats)

    def row(self, state: dict, name: str, eps: float, cms: torch.Tensor, flipped: torch.Tensor,
            stats: RowStats) -> dict:
        pixels, n_flipped = self.counts(state["clean_pred"].numel(), flipped.sum().item())
        stats = stats.reduced(self.dist)
        row = self.head(name, eps)
        split_cm = self.dist.sum(cms.sum(0))
        row.update(compute_metrics("segmentation", split_cm, self.spec.class_names))
        row.update(metric_interval("segmentation", split_cm, torch.cat(self.dist.gather(cms))))
        row.update({"flipped_fraction": n_flipped / pixels if pixels else math.nan, **stats.means(),
                    "seconds": stats.seconds})
        return row


# --------------------------------------------------------------------------- entry point
def run_split(model: nn.Module, source: SplitSource, spec: SweepSpec, engine: Engine = Engine(), *, split: str,
              make_attack: Callable[[str, float], Attack],
              target_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
              on_row: Callable[[dict], None] = lambda row: None,
              state_dir: Path | None = None, resume: bool = False, dist: Dist = Dist(), offset: int = 0) -> dict:
    """Sweep one split over ``spec.eps_list`` (ascending) and ``spec.attacks``; call ``on_row``
    after every row (one per attack, plus ``worst`` when there are several).

    ``make_attack(name, eps)`` returns ``attack(images, labels) -> adversarial images`` (labels
    are the targets from ``target_fn`` when ``spec.targeted``). With ``resume`` a matching
    state in ``state_dir`` is continued and its finished rows are passed to ``on_row`` again.
    Under torchrun ``source`` is this rank's shard, starting at sample ``offset`` of the split:
    rows are reduced over ranks, so every rank gets the rows of the whole split.
    Returns this rank's state: its ``rows``, per-attack per-sample outcomes and ``examples``
    (``original, label, caption`` and per eps ``eps, adv, pred``; of the whole split).
    """
    if list(spec.eps_list) != sorted(set(spec.eps_list)):
        raise ValueError("eps_list must be ascending without duplicates")
    if spec.targeted and target_fn is None:
        raise ValueError("a targeted sweep needs a target_fn")
    if len(source) == 0:
        raise DataError(f"split {split} has no samples; check --data, --splits and --limit")
    model.eval()
    state_path = None
    if state_dir is not None:
        name = f"{split}.pt" if not dist.active else f"{split}.rank{dist.rank}of{dist.world_size}.pt"
        state_path = Path(state_dir) / name
    state = load_state(state_path, spec) if resume and state_path is not None else None
    done = dist.gather(len(state["done_eps"]) if state is not None else -1)
    if len(set(done)) > 1:  # a kill between two ranks' saves: start the split again on every rank
        state = None
    for row in (state or {}).get("rows", []):
        on_row(row)
    kind = _ClassificationSweep if spec.task == "classification" else _SegmentationSweep
    sweeper = kind(model, source, spec, engine, split=split, make_attack=make_attack, target_fn=target_fn,
                   on_row=on_row, state_path=state_path, dist=dist, offset=offset)
    state = sweeper.run(state)
    if dist.active:
        state = {**state, "examples": merge_examples(dist.gather(state["examples"]))}
    return state
