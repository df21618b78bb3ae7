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

from utils import ToolError, atomic_savefig, atomic_write_csv, atomic_write_json, atomic_write_text  # noqa: E402

#: Config fields that change the numbers: a --resume with any of them different is refused.
RESUME_FIELDS = ("task", "checkpoint_sha256", "attack", "steps", "alpha", "random_start", "targeted",
                 "target_class", "target_map", "seed", "data", "limit")
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


def config_fingerprint(config: dict) -> str:
    """A short hash of the fields that decide the numbers (stored in the sweep state files)."""
    subset = {key: config.get(key) for key in RESUME_FIELDS}
    return hashlib.sha256(json.dumps(subset, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _clean(value: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _is_row(row: Any) -> bool:
    """A row as write_tables() writes it: split and attack names, a finite eps and eps_255."""
    if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("split", "attack")):
        return False
    return all(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
               and math.isfinite(row[key]) for key in ("eps", "eps_255"))


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
    for key in RESUME_FIELDS:
        if old_config.get(key) != config.get(key):
            raise ToolError(f"results in {out} were made with a different config ({key}: "
                            f"{old_config.get(key)} vs {config.get(key)}); use another --out or drop --resume")
    return rows


class Report:
    """Collects rows (keyed by split and eps) and writes every output file of a sweep."""

    def __init__(self, out: str | Path, task: str, config: dict, *, splits: Sequence[str],
                 eps_list: Sequence[float], resume: bool = False) -> None:
        self.out, self.task, self.config = Path(out), task, dict(config)
        self.splits, self.eps_list = list(splits), [float(e) for e in eps_list]
        self.fingerprint = config_fingerprint(self.config)
        self.examples: dict[str, dict] = {}
        self.rows: dict[tuple[str, float], dict] = {}
        for row in previous_rows(self.out, self.config) if resume else []:
            self._keep(row)

    def _keep(self, row: dict) -> None:
        key = (row["split"], float(row["eps"]))
        if key[0] in self.splits and key[1] in self.eps_list:
            self.rows[key] = row

    def sorted_rows(self) -> list[dict]:
        order = {name: i for i, name in enumerate(self.splits)}
        return [self.rows[key] for key in sorted(self.rows, key=lambda k: (order[k[0]], k[1]))]

    def columns(self) -> list[str]:
        rest: list[str] = []
        for row in self.sorted_rows():
            rest += [key for key in row if key not in HEAD_COLUMNS and key not in rest and key != "seconds"]
        return [*HEAD_COLUMNS, *rest, "seconds"]

    def add_row(self, row: dict) -> None:
        """Record a finished row and rewrite results.csv and results.json."""
        row = {key: _clean(value) for key, value in row.items()}
        row["eps_255"] = round(float(row["eps"]) * 255, 4)
        self._keep(row)
        self.write_tables()

    def add_examples(self, split: str, examples: dict) -> None:
        self.examples[split] = examples

    def write_tables(self) -> None:
        columns = self.columns()
        rows = [{col: row.get(col) for col in columns} for row in self.sorted_rows()]
        atomic_write_csv(self.out / "results.csv", rows, columns)
        atomic_write_json(self.out / "results.json", {"config": self.config, "rows": rows})

    def finish(self) -> None:
        """Tables, robustness curve, example grid and report.md."""
        self.write_tables()
        images = self.out / "Images"
        curve = images / ("AccClassif.png" if self.task == "classification" else "AccSegme.png")
        plot_curve(self.sorted_rows(), self.task, self.splits, curve)
        grid = None
        if self.examples and any(len(ex["label"]) for ex in self.examples.values()):
            split = "test" if "test" in self.examples else list(self.examples)[-1]
            grid = images / "images.png"
            plot_examples(self.examples[split], self.task, self.config.get("class_names"), split,
                          self.config.get("attack", ""), grid)
        atomic_write_text(self.out / "report.md", render_markdown(self, curve, grid))


# --------------------------------------------------------------------------- figures
def _series(rows: list[dict], split: str, key: str) -> tuple[list[float], list[float]]:
    chosen = [row for row in rows if row["split"] == split and row.get(key) is not None]
    return [row["eps_255"] for row in chosen], [row[key] for row in chosen]


def _dice_keys(rows: list[dict]) -> list[str]:
    keys = [key for key in (rows[0] if rows else {}) if key.startswith("dice_")]
    return [k for k in keys if k not in ("dice_mean", "dice_background")]


def plot_curve(rows: list[dict], task: str, splits: Sequence[str], path: Path) -> None:
    """Accuracy (classification) or Dice (segmentation) against eps*255, one colour per split."""
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = ["accuracy"] if task == "classification" else ["dice_mean", *_dice_keys(rows)]
    styles = ["-", "--", ":", "-."]
    for colour, split in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, splits):
        for style, key in zip(styles * 4, keys):
            xs, ys = _series(rows, split, key)
            ax.plot(xs, ys, style, marker="o", color=colour, label=f"{split} {key}")
    positive = [row["eps_255"] for row in rows if row["eps_255"] > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel("eps (x/255)")
    ax.set_ylabel("accuracy" if task == "classification" else "Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
                  attack: str, path: Path) -> None:
    """Rows: examples. Columns: original, [label mask], one per eps, amplified perturbation."""
    originals, labels = examples["original"], examples["label"]
    eps_values, advs, preds = examples["eps"], examples["adv"], examples["pred"]
    seg = task == "segmentation"
    extra = 2 if seg else 1
    n_rows, n_cols = len(labels), extra + len(eps_values) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.7 * n_cols, 1.9 * n_rows), squeeze=False)
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
                ax.set_title(f"eps {eps * 255:.3g}/255", fontsize=7)
            else:
                ax.imshow(_to_hwc(advs[c][r]))
                wrong = int(preds[c][r]) != int(labels[r])
                ax.set_title(f"{eps * 255:.3g}: {name(preds[c][r])}/{name(labels[r])}", fontsize=7,
                             color="red" if wrong else "black")
        last = advs[-1][r] - originals[r] if advs else originals[r] * 0
        axes[r, -1].imshow(_amplified(last))
        axes[r, -1].set_title("perturbation (amp.)", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{attack} on {split}: " + ("predicted masks" if seg else "prediction/label"), fontsize=9)
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


def render_markdown(report: Report, curve: Path, grid: Path | None) -> str:
    rows, cfg = report.sorted_rows(), report.config
    if report.task == "classification":
        metrics = ["accuracy", "balanced_accuracy", "attack_success_rate", "linf_mean", "l2_mean"]
    else:
        metrics = ["pixel_accuracy", "dice_mean", *_dice_keys(rows), "iou_mean", "flipped_fraction"]
    parts = [
        f"# Adversarial robustness: {cfg.get('attack')} on {report.task}",
        "",
        f"Checkpoint `{cfg.get('checkpoint')}` (sha256 `{str(cfg.get('checkpoint_sha256'))[:12]}`), "
        f"steps {cfg.get('steps')}, alpha {cfg.get('alpha')}, random start {cfg.get('random_start')}, "
        f"targeted {cfg.get('targeted')}, seed {cfg.get('seed')}, device {cfg.get('device')}.",
        "",
        f"![robustness curve]({curve.relative_to(report.out).as_posix()})",
        "",
    ]
    if grid is not None:
        parts += [f"![examples]({grid.relative_to(report.out).as_posix()})", ""]
    parts += [markdown_table(rows, ["split", "eps_255", "n", *metrics]), ""]
    return "\n".join(parts)
