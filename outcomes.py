"""What a sweep records: the perturbation statistics of a row, the samples shown as examples,
and how the per-sample outcomes and examples of all ranks' shards join into one split."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distributed import Dist


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
    mine = {"done_eps": state["done_eps"],
            "attacks": {name: {key: per_attack[key] for key in CHECK_FIELDS[task] if key in per_attack}
                        for name, per_attack in state["attacks"].items()}}
    parts = dist.gather(mine)
    if len(parts) == 1:
        return mine
    joined = {"done_eps": mine["done_eps"], "attacks": {}}
    for name in mine["attacks"]:
        joined["attacks"][name] = {}
        for key, value in mine["attacks"][name].items():
            pieces = [part["attacks"][name][key] for part in parts]
            joined["attacks"][name][key] = ([torch.cat([p[i] for p in pieces]) for i in range(len(value))]
                                            if isinstance(value, list) else torch.cat(pieces))
    return joined
