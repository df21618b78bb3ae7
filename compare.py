"""Compare finished sweeps side by side: ``python main.py --compare DIR1 DIR2 ...``.

Reads each folder's ``results.csv`` and writes ``compare.png`` (every run's robustness curve,
one panel per split, the legend taken from the folder names) and ``compare.md`` (the metric, with
its 95 % interval where recorded, of every run at every eps). A run that swept several attacks
is shown by its ``worst`` rows.
Where the runs were not measured alike (another step count, attack set, target, data or number
of samples; read from each folder's ``results.json`` and table), ``compare.md`` lists the
differences and the command prints a note: such a comparison is still drawn, but a curve may be
lower only because its attack was stronger.
Where two runs were tested on the same images and both wrote ``per_sample.npz``, ``compare.md``
also gives each run's paired difference from the first run at every eps: for accuracy
Newcombe's paired interval and McNemar's mid-p test, for Dice a paired bootstrap over images
and a paired permutation test.
"""
from __future__ import annotations

import csv
import json
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from files import atomic_savefig, atomic_write_text  # noqa: E402
from stats import (BOOTSTRAP_RESAMPLES, holm_adjusted, mcnemar_mid_p,  # noqa: E402
                   paired_dice_difference_interval, paired_dice_permutation_p, paired_difference_interval)
from utils import UsageError, eps_text, segmentation_metrics  # noqa: E402


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _read_table(path: Path) -> list[dict]:
    """The rows of a main.py ``results.csv``; anything else is a one-line usage error."""
    def refuse(why: str) -> UsageError:
        return UsageError(f"--compare: {path} is not a main.py results table ({why}); "
                          "give folders of finished main.py sweeps")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise refuse(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    missing = [c for c in ("split", "attack", "eps") if rows and c not in rows[0]]
    if missing:
        raise refuse(f"no {', '.join(missing)} column")
    for row in rows:
        if row.get("split") is None or row.get("attack") is None:
            raise refuse("a short row")
        if _number(row.get("eps")) is None:
            raise refuse(f"eps {row.get('eps')!r} is not a number")
    return rows


def _read_results(path: Path) -> tuple[dict, bool]:
    """The sweep settings a main.py ``results.json`` records (empty when absent or unreadable:
    the table alone is enough to draw the comparison), and whether the sweep finished (results
    written before the ``complete`` field existed count as finished)."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        config, complete = results.get("config", {}), results.get("complete", True)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return {}, True
    return (config if isinstance(config, dict) else {}), complete is not False


def _read_per_sample(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a run's ``per_sample.npz``; None when it has none, it cannot be read or its
    arrays are malformed (the comparison is then drawn without the paired tests)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    sound = all(_array_is_sound(key, value) for key, value in arrays.items()) and _lengths_agree(arrays)
    return arrays if sound else None


# The rank and kind of every ``<split>/...`` array a paired comparison reads, by its last name part.
_PER_SAMPLE_ARRAYS = {"eps": (1, np.floating), "wrong_eps": (1, np.floating), "labels": (1, np.integer),
                      "cms": (4, np.integer)}


def _array_is_sound(key: str, value: np.ndarray) -> bool:
    """Whether ``value`` has the rank and kind its name asks for (other arrays are not read)."""
    field = key.rsplit("/", 1)[-1]
    if field not in _PER_SAMPLE_ARRAYS:
        return True
    ndim, kind = _PER_SAMPLE_ARRAYS[field]
    if value.ndim != ndim or not np.issubdtype(value.dtype, kind):
        return False
    return field != "cms" or value.shape[2] == value.shape[3]  # eps x images x true x pred


def _lengths_agree(arrays: dict[str, np.ndarray]) -> bool:
    """Whether each split's cms have one entry per eps and its wrong_eps one per label."""
    for key, value in arrays.items():
        split, field = key.split("/", 1)[0], key.rsplit("/", 1)[-1]
        eps, labels = arrays.get(f"{split}/eps"), arrays.get(f"{split}/labels")
        if field == "cms" and eps is not None and len(eps) != value.shape[0]:
            return False
        if field == "wrong_eps" and labels is not None and len(labels) != len(value):
            return False
    return True


# What decides how strong an attack was or what it was measured on; a difference in any of
# them makes two curves not like for like (the model, seed, device and engine may differ).
COMPARABLE_SETTINGS = ("attacks", "steps", "alpha", "random_start", "targeted", "target_class", "target_map",
                       "data", "limit")


class Run:
    """One finished sweep: its name, task, norm and shown rows (worst case, else its attack)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.name = folder, folder.resolve().name
        rows = _read_table(folder / "results.csv")
        columns = rows[0].keys() if rows else ()
        self.task = "classification" if "accuracy" in columns else "segmentation" if "dice_mean" in columns else None
        self.key = "accuracy" if self.task == "classification" else "dice_mean"
        attacks = list(dict.fromkeys(row["attack"] for row in rows))
        self.shown = "worst" if "worst" in attacks else (attacks[0] if attacks else "")
        self.attacks = [a for a in attacks if a != "worst"]
        self.norm = "L2" if rows and all(row.get("eps_255") in ("", None) for row in rows) else "Linf"
        self.rows = [row for row in rows if row["attack"] == self.shown]
        self.config, self.complete = _read_results(folder / "results.json")
        self.samples = {row["split"]: row.get("n") for row in self.rows}
        digests = self.config.get("split_digests")
        self.split_digests = ({split: str(d) for split, d in digests.items()} if isinstance(digests, dict) else {})
        self.per_sample = _read_per_sample(folder / "per_sample.npz")

    @property
    def label(self) -> str:
        if self.shown == "worst":
            return f"{self.name} (worst of {', '.join(self.attacks)})"
        return self.name if len(self.attacks) <= 1 else f"{self.name} ({self.shown}; no worst-case rows yet)"

    def series(self, split: str) -> dict[float, float | None]:
        return {float(row["eps"]): _number(row.get(self.key)) for row in self.rows if row["split"] == split}

    def cells(self, split: str) -> dict[float, str]:
        """The table's text per eps: the metric and, where the run recorded it, its 95 % interval."""
        cells = {}
        for row in (row for row in self.rows if row["split"] == split):
            value = _number(row.get(self.key))
            low, high = _number(row.get(f"{self.key}_ci95_low")), _number(row.get(f"{self.key}_ci95_high"))
            text = "n/a" if value is None else f"{value:.4f}"
            if value is not None and low is not None and high is not None:
                text += f" ({low:.3f}–{high:.3f})"
            cells[float(row["eps"])] = text
        return cells

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(row["split"] for row in self.rows))


def load_runs(folders: Sequence[str]) -> list[Run]:
    """The runs of ``--compare``; folders without results or of different tasks are usage errors."""
    paths = [Path(folder) for folder in folders]
    missing = [str(path) for path in paths if not (path / "results.csv").is_file()]
    if missing:
        raise UsageError(f"--compare: no results.csv in {', '.join(missing)}; give folders of finished main.py sweeps")
    runs = [Run(path) for path in paths]
    unknown = [str(run.folder) for run in runs if run.task is None]
    if unknown:
        raise UsageError(f"--compare: {', '.join(unknown)} hold a results.csv without accuracy or dice_mean "
                         "columns; give folders of finished main.py sweeps")
    tasks = {run.task for run in runs}
    if len(tasks) > 1:
        by_task = "; ".join(f"{run.folder}: {run.task}" for run in runs)
        raise UsageError(f"--compare needs runs of one task, got {by_task}")
    norms = {run.norm for run in runs}
    if len(norms) > 1:
        raise UsageError("--compare needs runs of one norm (L-inf or L2), got both")
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        for run in runs:
            run.name = str(run.folder)
    return runs


def setting_differences(runs: Sequence[Run]) -> list[str]:
    """One line per setting in which the runs differ, naming each run's value; settings a run's
    ``results.json`` does not record are left out of the comparison."""
    lines = []
    for key in COMPARABLE_SETTINGS:
        known = [run for run in runs if key in run.config]
        values = [json.dumps(run.config[key], sort_keys=True) for run in known]
        if len(set(values)) > 1:
            lines.append(f"{key}: " + ", ".join(f"{run.name} {value}" for run, value in zip(known, values)))
    splits = dict.fromkeys(split for run in runs for split in run.splits)
    for split in splits:
        if runs[0].task == "classification" and _swept_below_differs(runs, split):
            lines.append(f"eps swept in {split} (more eps below a shared one is more attack: fooled samples stay "
                         "fooled): " + ", ".join(
                             f"{run.name} {' '.join(eps_text(e, run.norm) for e in sorted(run.series(split)))}"
                             for run in runs if run.series(split)))
        counts = [(run.name, run.samples.get(split)) for run in runs if run.samples.get(split) not in (None, "")]
        if len({count for _, count in counts}) > 1:
            lines.append(f"samples in {split}: " + ", ".join(f"{name} {count}" for name, count in counts))
        digests = [(run.name, run.split_digests[split]) for run in runs if split in run.split_digests]
        if len({digest for _, digest in digests}) > 1:
            lines.append(f"images in {split} (another --split-seed or data at training): "
                         + ", ".join(f"{name} {digest[:8]}" for name, digest in digests))
    return lines


def _swept_below_differs(runs: Sequence[Run], split: str) -> bool:
    """Whether, at some eps every run swept, the runs swept different eps at or below it."""
    swept = [{round(e, 9) for e in run.series(split)} for run in runs if run.series(split)]
    if len(swept) < 2:
        return False
    below = [[frozenset(e for e in eps if e <= shared) for eps in swept] for shared in set.intersection(*swept)]
    return any(len(set(sets)) > 1 for sets in below)


def plot_comparison(runs: Sequence[Run], path: Path) -> None:
    splits = list(dict.fromkeys(split for run in runs for split in run.splits))
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.2), squeeze=False)
    scale = 255 if runs[0].norm == "Linf" else 1
    for ax, split in zip(axes[0], splits):
        for run in runs:
            points = sorted((eps, value) for eps, value in run.series(split).items() if value is not None)
            ax.plot([e * scale for e, _ in points], [v for _, v in points], marker="o", label=run.label)
        positive = [e * scale for run in runs for e in run.series(split) if e > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set(title=split, xlabel="eps (x/255, L-inf)" if scale == 255 else "eps (L2)", ylabel=runs[0].key,
               ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def comparison_markdown(runs: Sequence[Run]) -> str:
    norm, key = runs[0].norm, runs[0].key
    parts = [f"# Comparison: {key} against eps", "",
             "Each run shows its worst case over its attacks (or its only attack):", ""]
    parts += [f"- **{run.name}**: {', '.join(run.attacks)} (`{run.folder}`)"
              + ("" if run.shown == "worst" or len(run.attacks) <= 1 else f"; no worst-case rows yet, shown: {run.shown}")
              + ("" if run.complete else "; **unfinished**: the sweep was interrupted, so rows may be missing "
                 "(finish it with `main.py --resume`)")
              for run in runs]
    differences = setting_differences(runs)
    if differences:
        parts += ["", "**Not like for like.** These runs differ in settings that change what the numbers mean "
                  "(a stronger attack or other samples lower a curve by itself):", ""]
        parts += [f"- {line}" for line in differences]
    parts += ["", "In brackets, a run's 95 % interval where its results.csv has one (see its report.md). Runs "
              "tested on the same images are paired, so a difference between them can be clear even where "
              "their intervals overlap."]
    for split in dict.fromkeys(split for run in runs for split in run.splits):
        cells = [run.cells(split) for run in runs]
        eps_values = sorted({eps for one in cells for eps in one})
        header = ["eps", *[run.name for run in runs]]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for eps in eps_values:
            lines.append("| " + " | ".join([eps_text(eps, norm), *(one.get(eps, "n/a") for one in cells)]) + " |")
        parts += ["", f"## {split}", "", *lines]
    if len(runs) > 1:
        parts += paired_markdown(runs)
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- paired differences
def _outcomes(run: Run, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A run's swept eps and the per-sample outcomes of its shown rows in ``split``."""
    field = "wrong_eps" if run.task == "classification" else "cms"
    arrays = run.per_sample or {}
    eps, outcome = arrays.get(f"{split}/eps"), arrays.get(f"{split}/{run.shown}/{field}")
    return None if eps is None or outcome is None else (eps, outcome)


def pairing_problem(first: Run, other: Run, split: str) -> str | None:
    """Why ``other`` cannot be compared with ``first`` sample by sample in ``split`` (None if it can)."""
    for run in (first, other):
        if run.per_sample is None:
            return (f"{run.name} has no readable per_sample.npz (a sweep writes it when it finishes; older "
                    "versions did not)")
        if _outcomes(run, split) is None:
            return f"{run.name}'s per_sample.npz has no {split} outcomes of its {run.shown} rows"
        if split not in run.split_digests:
            return f"{run.name}'s results.json does not say which images {split} holds"
    if first.split_digests[split] != other.split_digests[split]:
        return "they were tested on other images (another --split-seed or data at training)"
    sizes = [_outcomes(run, split)[1].shape[-3 if run.task == "segmentation" else 0] for run in (first, other)]
    if sizes[0] != sizes[1]:
        return f"{first.name} has {sizes[0]} {split} samples and {other.name} {sizes[1]} (another --limit?)"
    labels = [(run.per_sample or {}).get(f"{split}/labels") for run in (first, other)]
    if labels[0] is not None and labels[1] is not None and not np.array_equal(labels[0], labels[1]):
        return f"their {split} samples have other labels"
    return None


def _matching(eps_values: np.ndarray, eps: float) -> int | None:
    found = np.flatnonzero(np.isclose(eps_values, eps, rtol=0, atol=1e-9))
    return int(found[0]) if len(found) else None


def paired_differences(first: Run, other: Run, split: str) -> list[dict]:
    """Per eps both runs swept: ``other`` minus ``first`` on the same samples, with its 95 %
    interval and p-value (McNemar's mid-p with the discordant counts for accuracy, a paired
    permutation test for Dice)."""
    (eps_first, first_outcome), (eps_other, other_outcome) = _outcomes(first, split), _outcomes(other, split)
    rows = []
    for position, eps in enumerate(eps_first):
        at = _matching(eps_other, float(eps))
        if at is None:
            continue
        if first.task == "classification":
            right_first, right_other = first_outcome > eps, other_outcome > eps_other[at]  # each its own eps
            table = [int(np.sum(a & b)) for a, b in ((right_first, right_other), (right_first, ~right_other),
                                                     (~right_first, right_other), (~right_first, ~right_other))]
            low, high = paired_difference_interval(*table)
            rows.append({"eps": float(eps), "difference": (table[2] - table[1]) / len(right_first), "low": low,
                         "high": high, "only_first": table[1], "only_other": table[2],
                         "p": mcnemar_mid_p(table[1], table[2])})
        else:
            cms_first, cms_other = first_outcome[position], other_outcome[at]
            dice = [segmentation_metrics(cms.sum(0))["dice_mean"] for cms in (cms_first, cms_other)]
            low, high = paired_dice_difference_interval(cms_first, cms_other)
            rows.append({"eps": float(eps), "difference": dice[1] - dice[0], "low": low, "high": high,
                         "p": paired_dice_permutation_p(cms_first, cms_other)})
    return rows


def _signed(value: float, digits: int) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.{digits}f}"


def paired_markdown(runs: Sequence[Run]) -> list[str]:
    """The section of ``compare.md`` with every run's paired difference from the first run.

    Every row of the section (all splits, runs and eps) is one family for Holm's adjustment."""
    first, classification = runs[0], runs[0].task == "classification"
    method = ("for accuracy, Newcombe's paired score interval (method 10, 1998) and McNemar's mid-p test on the "
              "samples only one of the two runs gets right (mid-p: Fagerland et al. 2013)" if classification else
              f"for Dice, a paired percentile bootstrap over images ({BOOTSTRAP_RESAMPLES} resamples; each "
              "resample pools both runs' confusion matrices of the same images) and a paired permutation test "
              f"({BOOTSTRAP_RESAMPLES} random swaps of the two runs' matrices, image by image)")
    parts = ["", f"## Paired differences from {first.name}", "",
             f"Each run minus **{first.name}** on the same samples at the same eps, from the runs' "
             f"`per_sample.npz`: {method}. Because the runs are paired, an interval here can exclude 0 where "
             "the two runs' own intervals overlap. Each row is one test, so with many rows some small p-values "
             "are expected by chance; the Holm column adjusts every p-value of this section (all splits, runs "
             "and eps) as one family, so that rows with Holm p at most 0.05 hold together at the 5 % level."]
    header = (["eps", "run", "accuracy difference", "95 % interval", f"only {first.name} right",
               "only the run right", "McNemar mid-p"] if classification
              else ["eps", "run", "Dice difference", "95 % interval", "permutation p"]) + ["Holm p"]
    sections = {}
    for split in dict.fromkeys(split for run in runs for split in run.splits):
        rows, notes = [], []
        for other in runs[1:]:
            problem = pairing_problem(first, other, split)
            if problem is None:
                rows += [(other, row) for row in paired_differences(first, other, split)]
            else:
                notes.append(f"- {other.name}: not paired, {problem}.")
        sections[split] = rows, notes
    adjusted = iter(holm_adjusted([row["p"] for rows, _ in sections.values() for _, row in rows]))
    for split, (rows, notes) in sections.items():
        table = []
        for other, row in rows:
            interval = f"{_signed(row['low'], 3)} to {_signed(row['high'], 3)}"
            cells = [eps_text(row["eps"], first.norm), other.name, _signed(row["difference"], 4), interval]
            if classification:
                cells += [str(row["only_first"]), str(row["only_other"])]
            cells += [f"{row['p']:.3g}", f"{next(adjusted):.3g}"]
            table.append("| " + " | ".join(cells) + " |")
        parts += ["", f"### {split}", ""]
        if table:
            parts += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *table]
        parts += ([""] if table and notes else []) + notes
    return parts


def compare(runs: Sequence[Run], out: Path) -> None:
    """Write ``compare.png`` and ``compare.md`` for ``runs`` (from :func:`load_runs`) into ``out``."""
    plot_comparison(runs, out / "compare.png")
    atomic_write_text(out / "compare.md", comparison_markdown(runs))
