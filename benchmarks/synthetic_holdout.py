"""Accuracy of synthetic-sample classifiers on a large fresh synthetic sample, in one process.

    python benchmarks/synthetic_holdout.py Classification/checkpoints/best.pt runs/s1/checkpoints/best.pt

A test split of a few hundred images moves by a point or more with the training seed and the CPU's
float rounding. The synthetic generator can draw as many new images as wanted, so this script scores
each checkpoint on every image of another sample (default: 300 per class from seed 2, which shares
no image with the default sample of seed 0), with its 95 % Wilson interval and per-class recall.
That is the figure to judge a training setting by, never the test split itself. Not run by CI.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from dataset import ClassificationDataset, build_transform, make_loader  # noqa: E402
from raabin import find_classification_samples  # noqa: E402
from stats import wilson_interval  # noqa: E402
from synthetic import ensure_synthetic  # noqa: E402
from utils import ArgumentParser, ConfusionMatrix, UsageError, classification_metrics, run_cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="classification checkpoints trained on the synthetic sample")
    parser.add_argument("--per-class", type=int, default=300, help="images per class of the fresh sample")
    parser.add_argument("--seed", type=int, default=2, help="seed of the fresh sample (the default sample's is 0)")
    parser.add_argument("--sample", default=None,
                        help="keep the fresh sample in this folder (default: a temporary one)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


@torch.inference_mode()
def holdout_metrics(checkpoint: str, sample: Path, batch_size: int) -> dict:
    """Accuracy, its 95 % interval and per-class recall of ``checkpoint`` on all of ``sample``."""
    ckpt = load_checkpoint(checkpoint, task="classification")
    class_names = list(ckpt["class_names"])
    data = ClassificationDataset(find_classification_samples(sample / "Train"),
                                 build_transform("classification", ckpt["image_size"], train=False))
    model = model_from_checkpoint(ckpt).eval()
    cm = ConfusionMatrix(len(class_names))
    for images, target in make_loader(data, batch_size, train=False):
        cm.update(target, model(images).argmax(1))
    metrics = classification_metrics(cm.mat, class_names)
    total = int(cm.mat.sum())
    return {"images": total, "accuracy": metrics["accuracy"],
            "ci95": wilson_interval(int(cm.mat.diag().sum()), total),
            "recall": {name: metrics[f"recall_{name.lower()}"] for name in class_names}}


def main(args: argparse.Namespace) -> list[dict]:
    if args.per_class < 1 or args.batch_size < 1:
        raise UsageError("--per-class and --batch-size must be >= 1")
    if args.seed == 0:
        raise UsageError("--seed 0 is the default sample itself, whose test split is what this script checks; "
                         "use another seed")
    with tempfile.TemporaryDirectory() as scratch:
        sample = ensure_synthetic(Path(args.sample or Path(scratch) / "sample"), per_class=args.per_class,
                                  seed=args.seed)
        rows = []
        for checkpoint in args.checkpoints:
            row = {"checkpoint": checkpoint, **holdout_metrics(checkpoint, sample, args.batch_size)}
            recall = " ".join(f"{name[:4]} {value:.3f}" for name, value in row["recall"].items())
            print(f"{checkpoint}: accuracy {row['accuracy']:.4f} ({row['ci95'][0]:.3f}-{row['ci95'][1]:.3f}) "
                  f"on {row['images']} images; recall {recall}", flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
