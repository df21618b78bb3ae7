"""Compare finished sweeps side by side: ``python main.py --compare DIR1 DIR2 ...``.

Reads each folder's ``results.csv`` and writes ``compare.png`` (every run's robustness curve,
one panel per split, the legend taken from the folder names) and ``compare.md`` (the metric, with
its 95 % interval where recorded, of every run at every eps). A run that swept several attacks
is shown by its ``worst`` rows.
Where the runs were not measured alike (another step count, attack set, target, data or number
of samples; read from each folder's ``results.json`` and table), ``compare.md`` lists the
differences and the command prints a note: such a comparison is still drawn, but a curve may be
lower only because its attack was stronger.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from files import atomic_savefig, atomic_write_text  # noqa: E402
from utils import UsageError  # noqa: E402


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


def _read_config(path: Path) -> dict:
    """The sweep settings a main.py ``results.json`` records (empty when absent or unreadable:
    the table alone is enough to draw the comparison)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8")).get("config", {})
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return {}
    return config if isinstance(config, dict) else {}


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
        self.config = _read_config(folder / "results.json")
        self.samples = {row["split"]: row.get("n") for row in self.rows}
        digests = self.config.get("split_digests")
        self.split_digests = ({split: str(d) for split, d in digests.items()} if isinstance(digests, dict) else {})

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
        counts = [(run.name, run.samples.get(split)) for run in runs if run.samples.get(split) not in (None, "")]
        if len({count for _, count in counts}) > 1:
            lines.append(f"samples in {split}: " + ", ".join(f"{name} {count}" for name, count in counts))
        digests = [(run.name, run.split_digests[split]) for run in runs if split in run.split_digests]
        if len({digest for _, digest in digests}) > 1:
            lines.append(f"images in {split} (another --split-seed or data at training): "
                         + ", ".join(f"{name} {digest[:8]}" for name, digest in digests))
    return lines


def _eps_text(eps: float, norm: str) -> str:
    return f"{eps * 255:.3g}/255" if norm == "Linf" else f"{eps:.3g}"


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
            lines.append("| " + " | ".join([_eps_text(eps, norm), *(one.get(eps, "n/a") for one in cells)]) + " |")
        parts += ["", f"## {split}", "", *lines]
    return "\n".join(parts) + "\n"


def compare(runs: Sequence[Run], out: Path) -> None:
    """Write ``compare.png`` and ``compare.md`` for ``runs`` (from :func:`load_runs`) into ``out``."""
    plot_comparison(runs, out / "compare.png")
    atomic_write_text(out / "compare.md", comparison_markdown(runs))
