"""Time the default sweep engine against the original study's loop, in one process.

    python benchmarks/sweep_speed.py --checkpoint runs/real-cls/checkpoints/best.pt
    python benchmarks/sweep_speed.py --checkpoint runs/real-seg/checkpoints/best.pt

(a) the loop: for each eps, for each split, for each loader batch (decoded from disk),
    ``torchattacks.PGD`` on every sample, fp32, NCHW, then one forward to count;
(b) the default engine of main.py: each split decoded once, packed batches, per-sample early
    stop, channels_last, batch norms folded into the convolutions, ``--precision auto``, the
    clean prediction and each sample's first step computed once.
Both run PGD-10 with alpha = 2.5*eps/steps and no random start, on the same checkpoint and
splits. For each eps it prints both metrics, both times and their ratio; then each side's
peak RSS and its growth over the RSS it started from (each side starts from a trimmed heap).
It writes ``benchmarks/results/<machine>-<task>-<size>px.json``. Not run by CI.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torchattacks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacks import build_attack  # noqa: E402
from checkpoint import data_roots, load_checkpoint, model_from_checkpoint, split_seed  # noqa: E402
from dataset import build_splits, make_loader  # noqa: E402
from engine import Engine, prepare_model  # noqa: E402
from splitdata import load_split  # noqa: E402
from sweep import SweepSpec, run_split  # noqa: E402
from utils import (ArgumentParser, ConfusionMatrix, UsageError, compute_metrics, cpu_has_native_bf16,  # noqa: E402
                   parse_eps_list, primary_metric, resolve_device, resolve_precision, run_cli)

DEFAULT_EPS = {"classification": "0 2/255 4/255 8/255 16/255 32/255 64/255 128/255",
               "segmentation": "0 2/255 4/255 8/255 16/255 32/255"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=None, help="default: the checkpoint's data")
    parser.add_argument("--val-data", default=None, help="default: the checkpoint's --val-data, if it had one")
    parser.add_argument("--test-data", default=None, help="default: the checkpoint's --test-data, if it had one")
    parser.add_argument("--eps-list", nargs="+", default=None, help="default: main.py's 8 (classification) or 6")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--splits", nargs="+", default=["val", "test"], choices=["train", "val", "test"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--no-fold-batchnorm", action="store_true", help="run the engine as main.py --no-fold-batchnorm")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/<machine>-<task>-<size>px.json")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


# --------------------------------------------------------------------------- peak memory
def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process (Linux), so each side has its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is None:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak


def rss_mb() -> float:
    """The resident set now (Linux; elsewhere the peak, so growth reads 0)."""
    now = _status_mb("VmRSS")
    return peak_rss_mb() if now is None else now


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the kernel (glibc's malloc_trim; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_memory(run):
    """``run()``'s result, its peak RSS and its growth: peak minus the RSS it started from.

    Both sides start from a trimmed heap, so the second neither pays for nor reuses the pages
    the allocator kept from the first; the growth is what a side adds on its own.
    """
    release_free_memory()
    reset_peak_rss()
    start = rss_mb()
    result = run()
    peak = peak_rss_mb()
    return result, peak, peak - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- (a) the loop
def original_loop(ckpt, datasets, task, class_names, eps_list, args, device) -> list[dict]:
    """The obvious loop: every sample attacked at every eps, data decoded at every eps."""
    model = model_from_checkpoint(ckpt, device)
    rows = []
    for eps in eps_list:
        sync(device)
        start = time.perf_counter()
        cms = {split: ConfusionMatrix(len(class_names)) for split in datasets}
        for split, dataset in datasets.items():
            for images, targets in make_loader(dataset, args.batch_size, train=False, device=device):
                images, targets = images.to(device), targets.to(device)
                if eps > 0:
                    atk = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / args.steps, steps=args.steps,
                                           random_start=False)
                    images = atk(images, targets)
                with torch.no_grad():
                    cms[split].update(targets, model(images).argmax(1))
        sync(device)
        rows.append({"eps": eps, "seconds": time.perf_counter() - start,
                     "metric": {split: compute_metrics(task, cm.mat, class_names)[primary_metric(task)]
                                for split, cm in cms.items()}})
    return rows


# --------------------------------------------------------------------------- (b) the engine
def default_engine(ckpt, datasets, task, class_names, eps_list, args, device, autocast) -> list[dict]:
    """main.py's default: in-memory splits, fast engine, channels_last, folded batch norms, auto precision."""
    engine = Engine(kind="fast", device=device, batch_size=args.batch_size,
                    autocast=autocast, memory_format=torch.channels_last,
                    fold_batchnorm=not args.no_fold_batchnorm)
    model = prepare_model(model_from_checkpoint(ckpt, device), engine)
    spec = SweepSpec(task=task, class_names=class_names, eps_list=eps_list)
    seconds = {eps: 0.0 for eps in eps_list}
    metric: dict[float, dict] = {eps: {} for eps in eps_list}
    for split, dataset in datasets.items():
        sync(device)
        start = time.perf_counter()
        source, _ = load_split(dataset, task=task, image_size=ckpt["image_size"], max_bytes=4 * 2**30,
                               pin=device.type == "cuda")
        seconds[eps_list[0]] += time.perf_counter() - start

        def on_row(row, split=split):
            seconds[row["eps"]] += row["seconds"]
            metric[row["eps"]][split] = row[primary_metric(task)]

        run_split(model, source, spec, engine, split=split, on_row=on_row,
                  make_attack=lambda name, eps: build_attack(name, model, eps, steps=args.steps,
                                                             alpha=2.5 * eps / args.steps))
        sync(device)
    return [{"eps": eps, "seconds": seconds[eps], "metric": metric[eps]} for eps in eps_list]


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name, its family and model numbers where
    /proc/cpuinfo has them (a virtual machine calls Zen 4 and Zen 5 both "AMD EPYC"), ``-bf16``
    where bf16 is native (it sets the engine's ``--precision auto``), and the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).lower().replace(" ", "-")
    cpu = platform.processor() or platform.machine()
    info = _cpuinfo()
    if "model name" in info:
        cpu = info["model name"].lower().replace(" ", "-")
    if info.get("cpu family", "").isdigit() and info.get("model", "").isdigit():
        cpu += f"-f{info['cpu family']}m{info['model']}"
    return f"{cpu}{'-bf16' if cpu_has_native_bf16() else ''}-{torch.get_num_threads()}threads"


def results_name(device: torch.device, task: str, image_size: int) -> str:
    """The results file's name: the machine, the task and the image size (checkpoints of one task
    at two sizes, such as the 96 and 128 px classifiers, must not overwrite each other's figures)."""
    return f"{machine_name(device)}-{task}-{image_size}px.json"


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def main(args: argparse.Namespace) -> dict:
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    device = resolve_device(args.device)
    autocast = resolve_precision(args.precision, device)  # a bad --precision fails before the loop runs
    precision = str(autocast or torch.float32).removeprefix("torch.")
    ckpt = load_checkpoint(args.checkpoint)
    task, class_names = ckpt["task"], list(ckpt["class_names"])
    train_args = ckpt.get("args") or {}
    eps_list = parse_eps_list(args.eps_list or DEFAULT_EPS[task].split())
    roots = data_roots(train_args, data=args.data, val_data=args.val_data, test_data=args.test_data)
    datasets = build_splits(task, roots["data"], roots["val_data"], roots["test_data"],
                            image_size=ckpt["image_size"], seed=split_seed(train_args),
                            skip_missing_masks=bool(train_args.get("skip_missing_masks", False)))
    datasets = {split: datasets[split] for split in args.splits}
    with torch.no_grad():  # warm up kernels for both memory formats; each side then loads its own model
        model = model_from_checkpoint(ckpt, device)
        warm = torch.rand(2, 3, ckpt["image_size"], ckpt["image_size"], device=device)
        model(warm), model.to(memory_format=torch.channels_last)(warm.contiguous(memory_format=torch.channels_last))
        del model, warm

    loop, loop_peak, loop_growth = measure_memory(
        lambda: original_loop(ckpt, datasets, task, class_names, eps_list, args, device))
    fast, fast_peak, fast_growth = measure_memory(
        lambda: default_engine(ckpt, datasets, task, class_names, eps_list, args, device, autocast))

    print(f"{task} on {', '.join(f'{s} ({len(d)})' for s, d in datasets.items())}, PGD-{args.steps}, "
          f"{machine_name(device)}, engine in {precision}")
    print(f"{'eps':>8} | {'loop metric':>22} | {'engine metric':>22} | {'loop s':>8} | {'engine s':>8} | ratio")
    for a, b in zip(loop, fast):
        metrics = lambda row: " ".join(f"{row['metric'][s]:.3f}" for s in args.splits)  # noqa: E731
        print(f"{a['eps'] * 255:>6.4g}/255 | {metrics(a):>22} | {metrics(b):>22} | {a['seconds']:>8.1f} | "
              f"{b['seconds']:>8.1f} | {a['seconds'] / max(b['seconds'], 1e-9):.2f}x")
    total_loop, total_fast = sum(r["seconds"] for r in loop), sum(r["seconds"] for r in fast)
    print(f"total: loop {total_loop:.1f} s, engine {total_fast:.1f} s, ratio {total_loop / total_fast:.2f}x; "
          f"peak RSS loop {loop_peak:.0f} MB, engine {fast_peak:.0f} MB; growth over each side's start "
          f"loop {loop_growth:.0f} MB, engine {fast_growth:.0f} MB")
    result = {"task": task, "machine": machine_name(device), "device": str(device), "engine_precision": precision,
              "steps": args.steps,
              "batch_size": args.batch_size, "checkpoint": str(args.checkpoint),
              "splits": {s: len(d) for s, d in datasets.items()}, "torch": torch.__version__,
              "loop": loop, "engine": fast, "total_loop_s": total_loop, "total_engine_s": total_fast,
              "ratio": total_loop / total_fast, "peak_rss_mb": {"loop": loop_peak, "engine": fast_peak},
              "rss_growth_mb": {"loop": loop_growth, "engine": fast_growth}}
    out = Path(args.out or ROOT / "benchmarks" / "results" / results_name(device, task, ckpt["image_size"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
