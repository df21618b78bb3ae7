"""What a sweep records: the perturbation statistics of a row, the samples shown as examples,
and how the per-sample outcomes and examples of all ranks' shards join into one split."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distributed import Dist
from utils import worst_case_choice


@dataclass
class RowStats:
    """Perturbation statistics of the samples attacked in one row."""

    n_attacked: int = 0
    linf_sum: float = 0.0
    l2_sum: float = 0.0
    linf_max: float = 0.0
    l2_max: float = 0.0
    seconds: float = 0.0

    def add_norms(self, linf: torch.Tensor, l2: torch.Tensor) -> None:
        if len(linf):
            self.n_attacked += len(linf)
            self.linf_sum += linf.double().sum().item()
            self.l2_sum += l2.double().sum().item()
            self.linf_max = max(self.linf_max, linf.max().item())
            self.l2_max = max(self.l2_max, l2.max().item())

    def merge(self, other: RowStats) -> None:
        self.n_attacked += other.n_attacked
        self.linf_sum += other.linf_sum
        self.l2_sum += other.l2_sum
        self.linf_max = max(self.linf_max, other.linf_max)
        self.l2_max = max(self.l2_max, other.l2_max)
        self.seconds += other.seconds

    def reduced(self, dist: Dist) -> RowStats:
        """The statistics of the whole split (summed, or the max, over ranks)."""
        totals = dist.sum(torch.tensor([self.n_attacked, self.linf_sum, self.l2_sum], dtype=torch.float64))
        return RowStats(int(totals[0]), float(totals[1]), float(totals[2]), dist.max_float(self.linf_max),
                        dist.max_float(self.l2_max), dist.max_float(self.seconds))

    def means(self) -> dict:
        """Mean and max norms (the max is the row's visible sanity check against eps)."""
        n = self.n_attacked
        return {"n_attacked": n, "linf_mean": self.linf_sum / n if n else 0.0,
                "l2_mean": self.l2_sum / n if n else 0.0, "linf_max": self.linf_max, "l2_max": self.l2_max}


# --------------------------------------------------------------------------- examples
def example_indices(labels: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Up to ``k`` allowed samples, class after class: the first of each class, then the second...
    (indices into ``labels``, sorted)."""
    by_class = [torch.nonzero(allowed & (labels == c)).flatten().tolist() for c in sorted(set(labels.tolist()))]
    chosen: list[int] = []
    for rank in range(max((len(members) for members in by_class), default=0)):
        chosen += [members[rank] for members in by_class if rank < len(members)]
    return torch.tensor(sorted(chosen[:k]), dtype=torch.long)


def example_slots(n: int, ex_index: torch.Tensor) -> torch.Tensor:
    """Sample index -> example slot (-1 for samples that are not shown)."""
    slots = torch.full((n,), -1, dtype=torch.long)
    slots[ex_index] = torch.arange(len(ex_index))
    return slots


# --------------------------------------------------------------------------- joining the ranks
def merge_examples(parts: list[dict]) -> dict:
    """The examples of all ranks' shards as one set, in split order."""
    present = [part for part in parts if len(part["index"])]
    if not present:
        return parts[0]
    order = torch.argsort(torch.cat([part["index"] for part in present]))
    cat = lambda key: torch.cat([part[key] for part in present])[order]  # noqa: E731
    merged = {key: cat(key) for key in ("original", "label", "class", "index")}
    merged.update(eps=present[0]["eps"], caption=present[0]["caption"],
                  adv=[torch.cat([p["adv"][i] for p in present])[order] for i in range(len(present[0]["eps"]))],
                  pred=[torch.cat([p["pred"][i] for p in present])[order] for i in range(len(present[0]["eps"]))])
    return merged


#: Per-sample outcomes the checklist reuses, by task.
CHECK_FIELDS = {"classification": ("wrong_eps", "pred", "hit"), "segmentation": ("cms",)}


def gather_outcomes(state: dict, task: str, dist: Dist) -> dict:
    """The per-sample outcomes of every attack over the whole split (all ranks' shards)."""
    mine = {"done_eps": state["done_eps"], "labels": state.get("labels"),
            "attacks": {name: {key: per_attack[key] for key in CHECK_FIELDS[task] if key in per_attack}
                        for name, per_attack in state["attacks"].items()}}
    parts = dist.gather(mine)
    if len(parts) == 1:
        return mine
    labels = [part["labels"] for part in parts]
    joined = {"done_eps": mine["done_eps"], "attacks": {},
              "labels": torch.cat(labels) if all(part is not None for part in labels) else None}
    for name in mine["attacks"]:
        joined["attacks"][name] = {}
        for key, value in mine["attacks"][name].items():
            pieces = [part["attacks"][name][key] for part in parts]
            joined["attacks"][name][key] = ([torch.cat([p[i] for p in pieces]) for i in range(len(value))]
                                            if isinstance(value, list) else torch.cat(pieces))
    return joined


def per_sample_arrays(outcomes: dict, task: str, attacks: Sequence[str]) -> dict[str, np.ndarray]:
    """What ``per_sample.npz`` keeps of one split (from :func:`gather_outcomes`), in split order.

    ``eps``: the swept eps. Classification: ``labels`` and, per attack, ``<attack>/wrong_eps``,
    the smallest swept eps at which the sample is wrong (0: wrong when clean; inf: right at every
    eps), so it is right at eps e exactly when ``wrong_eps > e``. Segmentation: per attack,
    ``<attack>/cms``, every image's confusion matrix at every eps (eps x images x true x pred).
    With several attacks ``worst/...`` is the worst case, chosen by the rule of the table's
    ``worst`` rows, so a paired comparison of two runs can use the rows they show.
    """
    arrays = {"eps": np.asarray(outcomes["done_eps"], dtype=np.float64)}
    per_attack = outcomes["attacks"]
    if task == "classification":
        arrays["labels"] = outcomes["labels"].numpy().astype(np.int64)
        wrong = {name: per_attack[name]["wrong_eps"].double() for name in attacks}
        if len(attacks) > 1:
            wrong["worst"] = torch.stack(list(wrong.values())).amin(0)
        arrays.update({f"{name}/wrong_eps": value.numpy() for name, value in wrong.items()})
        return arrays
    cms = {name: [c.long() for c in per_attack[name]["cms"]] for name in attacks}
    if len(attacks) > 1:
        worst = []
        for at_eps in zip(*cms.values()):
            chosen = worst_case_choice(list(at_eps))
            worst.append(torch.stack(at_eps)[chosen, torch.arange(len(chosen))])
        cms["worst"] = worst
    arrays.update({f"{name}/cms": torch.stack(per_eps).numpy() for name, per_eps in cms.items()})
    return arrays
