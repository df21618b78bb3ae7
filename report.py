"""Results of a sweep: results.csv/json after every row, then the figures and report.md.

Every file is written atomically, so an interrupted sweep leaves the previous complete
version behind, never half a file. Without ``--resume`` an existing results.json is only
replaced once the first new row is finished.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from files import atomic_savefig, atomic_savez, atomic_write_csv, atomic_write_json, atomic_write_text  # noqa: E402
from stats import BOOTSTRAP_RESAMPLES  # noqa: E402
from utils import ToolError, eps_text  # noqa: E402

#: Config fields that change the numbers: a --resume with any of them different is refused.
RESUME_FIELDS = ("task", "checkpoint_sha256", "attacks", "steps", "alpha", "random_start", "targeted",
                 "target_class", "target_map", "seed", "data", "limit", "engine", "precision", "memory_format",
                 "early_stop", "fold_batchnorm", "device", "worst_case")
HEAD_COLUMNS = ("split", "attack", "eps", "eps_255", "n")
MASK_COLOURS = ListedColormap(["#f4e6a6", "#c77dba", "#3b1f6b"])  # background, cytoplasm, nucleus


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "torchattacks", "cleverhans", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def resume_fields(config: dict) -> tuple[str, ...]:
    """The config fields that decide the numbers: the batch size too when an attack draws
    its randomness per call rather than per sample (APGD, Square, library PGD, ...), and the
    separate val/test roots when there are any (so a sweep without them keeps its fingerprint)."""
    return (RESUME_FIELDS + (("batch_size",) if config.get("numbers_depend_on_batch_size") else ())
            + tuple(root for root in ("val_data", "test_data") if config.get(root) is not None))


def _checklist_context(context: dict | None) -> list[str]:
    """The line above the checklist: which samples it ran on, and whether PGD is the sweep's own."""
    if not context:
        return []
    pgd = "the sweep's own PGD results" if context.get("reuses_sweep_pgd") else "fresh PGD runs"
    return [f"On a stratified subset of {context.get('samples')} {context.get('split')} samples, with {pgd} "
            "where a check compares with PGD.", ""]


def config_fingerprint(config: dict) -> str:
    """A short hash of the fields that decide the numbers (stored in the sweep state files)."""
    subset = {key: config.get(key) for key in resume_fields(config)}
    return hashlib.sha256(json.dumps(subset, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _clean(value: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _is_row(row: Any) -> bool:
    """A row as write_tables() writes it: split and attack names, a finite eps, and eps_255
    (a number, or null for L2 budgets)."""
    if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("split", "attack")):
        return False
    return _finite_number(row.get("eps")) and (row.get("eps_255") is None or _finite_number(row["eps_255"]))


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def previous_rows(out: Path, config: dict) -> list[dict]:
    """Rows of ``<out>/results.json`` if it was made with the same config (for --resume)."""
    path = out / "results.json"
    if not path.is_file():
        return []
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ToolError(f"{path} is unreadable ({err}); use another --out or drop --resume") from err
    old_config, rows = (previous.get("config"), previous.get("rows")) if isinstance(previous, dict) else (None, None)
    if not isinstance(old_config, dict) or not isinstance(rows, list) or not all(map(_is_row, rows)):
        raise ToolError(f"{path} is not a results file of main.py (it needs a config object and rows with a "
                        "split, attack, eps and eps_255); use another --out or drop --resume")
    for key in dict.fromkeys(resume_fields(old_config) + resume_fields(config)):
        if old_config.get(key) != config.get(key):
            raise ToolError(f"results in {out} were made with a different config ({key}: "
                            f"{old_config.get(key)} vs {config.get(key)}); use another --out or drop --resume")
    return rows


#: What a finished sweep writes besides its tables; each goes once a new (not resumed) sweep's
#: first row is in, so a folder never holds the tables of one sweep next to the report or
#: figures of another.
SWEEP_OUTPUTS = ("per_sample.npz", "report.md", "Images/AccClassif.png", "Images/AccSegme.png", "Images/images.png")


def refuse_earlier_sweep(out: Path, *, resume: bool, overwrite: bool) -> None:
    """A new sweep never silently replaces the results of an earlier one in ``out``."""
    if not resume and not overwrite and (out / "results.json").exists():
        raise ToolError(f"{out} already holds the results of an earlier sweep (results.json); pass --resume to "
                        "continue it, --overwrite to replace it, or choose another --out")


def _row_span(rows: Sequence[dict], norm: str) -> str:
    """The splits and eps of ``rows``, e.g. "val at 0, 8/255; test at 16/255"."""
    by_split: dict[str, list[float]] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append(float(row["eps"]))
    return "; ".join(f"{split} at {', '.join(eps_text(e, norm) if e else '0' for e in sorted(set(eps)))}"
                     for split, eps in by_split.items())


class Report:
    """Collects rows (keyed by split, eps and attack) and writes every output file of a sweep."""

    def __init__(self, out: str | Path, task: str, config: dict, *, splits: Sequence[str],
                 eps_list: Sequence[float], attacks: Sequence[str] = ("pgd",), resume: bool = False) -> None:
        self.out, self.task, self.config, self.resume = Path(out), task, dict(config), resume
        self.splits, self.eps_list = list(splits), [float(e) for e in eps_list]
        self.attacks = [*attacks, "worst"] if len(attacks) > 1 else list(attacks)
        self.fingerprint = config_fingerprint(self.config)
        self.examples: dict[str, dict] = {}
        self.per_sample: dict[str, np.ndarray] = {}
        self.checks: list[dict] | None = None
        self.finished = False
        self.rows: dict[tuple[str, float, str], dict] = {}
        dropped = []
        for row in previous_rows(self.out, self.config) if resume else []:
            if not self._keep(row):
                dropped.append(row)
        if dropped:
            raise ToolError(f"--resume would drop finished rows in {self.out} that this run does not ask for "
                            f"({_row_span(dropped, self.norm)}); give their --splits and --eps-list again (the "
                            "eps list may grow), or use another --out")

    @property
    def norm(self) -> str:
        return self.config.get("norm", "Linf")

    def _keep(self, row: dict) -> bool:
        """Hold ``row`` if this sweep asks for its split, eps and attack; whether it was held."""
        key = (row["split"], float(row["eps"]), row.get("attack"))
        if key[0] in self.splits and key[1] in self.eps_list and key[2] in self.attacks:
            self.rows[key] = row
            return True
        return False

    def sorted_rows(self) -> list[dict]:
        split_order = {name: i for i, name in enumerate(self.splits)}
        attack_order = {name: i for i, name in enumerate(self.attacks)}
        keys = sorted(self.rows, key=lambda k: (split_order[k[0]], k[1], attack_order[k[2]]))
        return [self.rows[key] for key in keys]

    def columns(self) -> list[str]:
        rest: list[str] = []
        for row in self.sorted_rows():
            rest += [key for key in row if key not in HEAD_COLUMNS and key not in rest and key != "seconds"]
        return [*HEAD_COLUMNS, *rest, "seconds"]

    def add_row(self, row: dict) -> None:
        """Record a finished row and rewrite results.csv and results.json."""
        row = {key: _clean(value) for key, value in row.items()}
        row["eps_255"] = round(float(row["eps"]) * 255, 4) if self.norm == "Linf" else None
        self._keep(row)
        self.write_tables()
        # The tables now describe this sweep: outcomes, figures and a report of an earlier one go
        # (a resumed sweep keeps its own figures and report until it finishes).
        for name in ("per_sample.npz",) if self.resume else SWEEP_OUTPUTS:
            (self.out / name).unlink(missing_ok=True)

    def add_examples(self, split: str, examples: dict) -> None:
        self.examples[split] = examples

    def add_per_sample(self, split: str, arrays: dict[str, np.ndarray]) -> None:
        """A split's per-sample outcomes (``outcomes.per_sample_arrays``) for ``per_sample.npz``."""
        self.per_sample.update({f"{split}/{key}": value for key, value in arrays.items()})

    def add_checks(self, checks: list[dict]) -> None:
        self.checks = [{key: _clean(value) for key, value in check.items()} for check in checks]

    def write_tables(self) -> None:
        columns = self.columns()
        rows = [{col: row.get(col) for col in columns} for row in self.sorted_rows()]
        atomic_write_csv(self.out / "results.csv", rows, columns)
        # "complete" stays false until finish(): the tables of an interrupted sweep say so
        payload = {"config": self.config, "complete": self.finished, "rows": rows}
        if self.checks is not None:
            payload["checks"] = self.checks
        atomic_write_json(self.out / "results.json", payload)

    def finish(self) -> None:
        """Tables, per-sample outcomes, robustness curves, example grid and report.md."""
        self.finished = True
        self.write_tables()
        if self.per_sample:
            atomic_savez(self.out / "per_sample.npz", self.per_sample)
        images = self.out / "Images"
        curve = images / ("AccClassif.png" if self.task == "classification" else "AccSegme.png")
        plot_curves(self.sorted_rows(), self.task, self.splits, self.attacks, self.norm, curve)
        grid = None
        shown_splits = [split for split, ex in self.examples.items() if len(ex["label"])]
        if shown_splits:
            split = "test" if "test" in shown_splits else shown_splits[-1]
            grid = images / "images.png"
            shown = self.attacks[0] if len(self.attacks) == 1 else "worst case of " + ", ".join(self.attacks[:-1])
            plot_examples(self.examples[split], self.task, self.config.get("class_names"), split, shown,
                          self.norm, grid)
        atomic_write_text(self.out / "report.md", render_markdown(self, curve, grid))


# --------------------------------------------------------------------------- figures
def eps_axis(rows: list[dict], norm: str) -> tuple[str, list[float]]:
    """The x label and values: L-inf eps in grey levels (x/255), L2 eps as plain numbers."""
    if norm == "Linf":
        return "eps (x/255, L-inf)", [row["eps"] * 255 for row in rows]
    return "eps (L2)", [row["eps"] for row in rows]


def _dice_keys(rows: list[dict]) -> list[str]:
    keys = [key for key in (rows[0] if rows else {}) if key.startswith("dice_")]
    return [k for k in keys if k not in ("dice_mean", "dice_background") and "_ci95_" not in k]


def plot_curves(rows: list[dict], task: str, splits: Sequence[str], attacks: Sequence[str], norm: str,
                path: Path) -> None:
    """Accuracy or mean Dice against eps: one panel per split, one line per attack and a bold
    worst-case line (a single segmentation attack also shows its per-class Dice)."""
    key = "accuracy" if task == "classification" else "dice_mean"
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, split in zip(axes[0], splits):
        for colour, attack in zip(colours * 4, attacks):
            chosen = [row for row in rows if row["split"] == split and row["attack"] == attack
                      and row.get(key) is not None]
            label, xs = eps_axis(chosen, norm)
            worst = attack == "worst"
            ax.plot(xs, [row[key] for row in chosen], "-", marker="o", color="black" if worst else colour,
                    linewidth=3 if worst else 1.5, label=f"{attack} {key}", zorder=3 if worst else 2)
            if attack == attacks[-1] and all(row.get(f"{key}_ci95_low") is not None for row in chosen):
                ax.fill_between(xs, [row[f"{key}_ci95_low"] for row in chosen],
                                [row[f"{key}_ci95_high"] for row in chosen], color="black" if worst else colour,
                                alpha=0.12, linewidth=0, label=f"{attack} 95 % interval")
            if task == "segmentation" and len(attacks) == 1:
                for style, dice in zip(["--", ":", "-."], _dice_keys(chosen)):
                    ax.plot(xs, [row[dice] for row in chosen], style, marker=".", color=colour, label=dice)
        positive = [x for x in eps_axis([r for r in rows if r["split"] == split], norm)[1] if x > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set(xlabel=eps_axis([], norm)[0], ylabel="accuracy" if task == "classification" else "Dice",
               title=split, ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def _to_hwc(image) -> np.ndarray:
    return np.clip(image.detach().cpu().float().permute(1, 2, 0).numpy(), 0, 1)


def _amplified(delta) -> np.ndarray:
    delta = delta.detach().cpu().float()
    scale = max(delta.abs().max().item(), 1e-12)
    return np.clip((delta / (2 * scale) + 0.5).permute(1, 2, 0).numpy(), 0, 1)


def plot_examples(examples: dict, task: str, class_names: Sequence[str] | None, split: str,
                  attack: str, norm: str, path: Path) -> None:
    """Rows: examples. Columns: original, [label mask], one per eps, amplified perturbation."""
    originals, labels = examples["original"], examples["label"]
    eps_values, advs, preds = examples["eps"], examples["adv"], examples["pred"]
    seg = task == "segmentation"
    extra = 2 if seg else 1
    n_rows, n_cols = len(labels), extra + len(eps_values) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.7 * n_cols, 1.9 * n_rows + 0.4), squeeze=False)
    name = (lambda i: str(class_names[int(i)])[:4]) if class_names else (lambda i: str(int(i)))
    for r in range(n_rows):
        axes[r, 0].imshow(_to_hwc(originals[r]))
        axes[r, 0].set_title("original" if seg else f"label {name(labels[r])}", fontsize=7)
        if seg:
            axes[r, 1].imshow(labels[r].numpy(), cmap=MASK_COLOURS, vmin=0, vmax=2, interpolation="nearest")
            axes[r, 1].set_title("label", fontsize=7)
        for c, eps in enumerate(eps_values):
            ax = axes[r, extra + c]
            if seg:
                ax.imshow(preds[c][r].numpy(), cmap=MASK_COLOURS, vmin=0, vmax=2, interpolation="nearest")
                ax.set_title(f"eps {eps_text(eps, norm)}", fontsize=7)
            else:
                ax.imshow(_to_hwc(advs[c][r]))
                wrong = int(preds[c][r]) != int(labels[r])
                ax.set_title(f"{eps_text(eps, norm)}: {name(preds[c][r])}/{name(labels[r])}", fontsize=7,
                             color="red" if wrong else "black")
        last = advs[-1][r] - originals[r] if advs else originals[r] * 0
        axes[r, -1].imshow(_amplified(last))
        axes[r, -1].set_title("perturbation (amp.)", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    shown = "predicted masks" if seg else "prediction/label"
    fig.suptitle(f"{attack} on {split}: {shown}\nrows: {examples.get('caption', 'the first samples')}", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown
def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(col)) for col in columns) + " |" for row in rows]
    return "\n".join(lines)


def with_interval(row: dict, key: str) -> str | float | None:
    """``key``, followed by its 95 % interval where the row has one: ``0.5778 (0.433–0.711)``."""
    value, low, high = row.get(key), row.get(f"{key}_ci95_low"), row.get(f"{key}_ci95_high")
    if value is None or low is None or high is None:
        return value
    return f"{value:.4f} ({low:.3f}–{high:.3f})"


def pivot_table(report: Report, key: str) -> str:
    """``key`` (with its 95 % interval) per (split, eps) row and one column per attack (and the
    worst case)."""
    table = []
    for split in report.splits:
        for eps in report.eps_list:
            cells = {attack: with_interval(report.rows.get((split, eps, attack), {}), key)
                     for attack in report.attacks}
            if any(value is not None for value in cells.values()):
                table.append({"split": split, "eps": eps_text(eps, report.norm), **cells})
    return markdown_table(table, ["split", "eps", *report.attacks])


def _copies_warning(copies: dict | None) -> list[str]:
    """A paragraph when evaluated splits hold byte-identical copies of training images."""
    found = [f"{count} {split}" for split, count in (copies or {}).items() if count]
    if not found:
        return []
    return [f"**Data warning:** {' and '.join(found)} images are byte-identical to training images, so these "
            "splits' metrics are optimistic (the model was trained on them).", ""]


def render_markdown(report: Report, curve: Path, grid: Path | None) -> str:
    rows, cfg = report.sorted_rows(), report.config
    key = "accuracy" if report.task == "classification" else "dice_mean"
    if report.task == "classification":
        metrics = ["accuracy", "balanced_accuracy", "attack_success_rate", "linf_mean", "l2_mean"]
    else:
        metrics = ["pixel_accuracy", "dice_mean", *_dice_keys(rows), "iou_mean", "flipped_fraction"]
    attacks = ", ".join(a for a in report.attacks if a != "worst")
    parts = [
        f"# Adversarial robustness: {attacks} on {report.task}",
        "",
        f"Checkpoint `{cfg.get('checkpoint')}` (sha256 `{str(cfg.get('checkpoint_sha256'))[:12]}`), "
        f"{cfg.get('norm', 'Linf')} budgets, steps {cfg.get('steps')}, alpha {cfg.get('alpha')}, "
        f"random start {cfg.get('random_start')}, targeted {cfg.get('targeted')}, seed {cfg.get('seed')}, "
        f"device {cfg.get('device')}, engine {cfg.get('engine')} ({cfg.get('precision')}, "
        f"early stop {cfg.get('early_stop')}).",
        "",
        *_copies_warning(cfg.get("copies_of_training_images")),
        f"![robustness curve]({curve.relative_to(report.out).as_posix()})",
        "",
        f"## {key} by attack", "",
        "In brackets, a 95 % confidence interval for what a split of this many images can tell: "
        + ("Wilson's score interval." if report.task == "classification" else
           f"a percentile bootstrap over images ({BOOTSTRAP_RESAMPLES} resamples of the split's images, "
           "Dice pooled over each resample's pixels as in the table)."),
        "", pivot_table(report, key), "",
    ]
    if report.checks is not None:
        parts += ["## Gradient-masking checklist", "", *_checklist_context(cfg.get("checklist")),
                  markdown_table(report.checks, ["id", "name", "status", "value", "detail"]), ""]
    if grid is not None:
        parts += [f"![examples]({grid.relative_to(report.out).as_posix()})", ""]
    shown = [{**row, "eps": eps_text(row["eps"], report.norm)} for row in rows]
    parts += ["## All rows", "", markdown_table(shown, ["split", "attack", "eps", "n", *metrics]), ""]
    return "\n".join(parts)
