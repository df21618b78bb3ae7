"""Adversarial training (adversarial.py, train.py --adv): flags, PGD-AT batches, the TRADES loss,
the eps warm-up, the robust validation metric and best.pt, outputs, and a bit-exact resume."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train as train_cli
from adversarial import AdvSettings, adversarial_batch, adversarial_settings, trades_loss
from checkpoint import load_checkpoint
from run_folder import best_metric_key, best_row
from utils import CheckpointError, run_cli

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {"Basophil": 3, "Eosinophil": 3, "Lymphocyte": 4, "Monocyte": 3, "Neutrophil": 5}
SEG_COUNTS = {"Lymphocyte": 3, "Neutrophil": 3}


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--depth", "18", "--data", str(data), "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--out", str(out), "--adv-steps", "1", "--adv-val-limit", "3",
            *extra]


def tiny_classifier(batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), *([nn.BatchNorm2d(4)] if batchnorm else []), nn.ReLU(),
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- flags
BAD_FLAGS = [
    pytest.param(["--adv-eps", "2"], "--adv-eps", id="eps-above-1"),
    pytest.param(["--adv-eps", "-1/255"], "--adv-eps", id="eps-negative"),
    pytest.param(["--adv-eps", "abc"], "--adv-eps", id="eps-unparsable"),
    pytest.param(["--adv-eps", "nan"], "--adv-eps", id="eps-nan"),
    pytest.param(["--adv-steps", "0"], "--adv-steps", id="steps"),
    pytest.param(["--adv-alpha", "0"], "--adv-alpha", id="alpha-zero"),
    pytest.param(["--adv-alpha", "-0.1"], "--adv-alpha", id="alpha-negative"),
    pytest.param(["--trades-beta", "-1"], "--trades-beta", id="beta"),
    pytest.param(["--adv-warmup-epochs", "-1"], "--adv-warmup-epochs", id="warmup"),
    pytest.param(["--adv-val-limit", "0"], "--adv-val-limit", id="val-limit"),
    pytest.param(["--adv", "trades", "--task", "segmentation"], "--adv trades", id="trades-segmentation"),
    pytest.param(["--adv-attack", "segpgd"], "--adv-attack segpgd", id="segpgd-classification"),
    pytest.param(["--adv", "fgsm"], "--adv", id="unknown-kind"),
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS)
def test_bad_adversarial_flags_are_one_line_usage_errors_before_any_output(flags, named, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        rc = run_cli(train_cli.main, train_cli.get_args_parser().parse_args(["--out", str(out), "--adv", "pgd",
                                                                              *flags]))
    except SystemExit as exc:  # argparse's choices
        rc = exc.code
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not out.exists()


def test_eps_is_parsed_as_a_fraction_and_alpha_defaults_to_2_5_eps_over_steps():
    args = train_cli.get_args_parser().parse_args(["--adv", "pgd", "--adv-eps", "8/255", "--adv-steps", "4"])
    train_cli.validate_args(args)
    assert args.adv_eps == pytest.approx(8 / 255)
    assert AdvSettings(eps=8 / 255, steps=4).alpha_for(8 / 255) == pytest.approx(2.5 * 8 / 255 / 4)
    assert AdvSettings(eps=8 / 255, steps=4, alpha=0.01).alpha_for(2 / 255) == 0.01


def test_adv_alpha_takes_a_fixed_step_or_a_fraction_of_the_ramped_eps():
    """--adv-alpha 2/255 is one step at every eps; eps/4 follows the warm-up's eps, as the
    default rule does."""
    parser = train_cli.get_args_parser()
    fixed = parser.parse_args(["--adv", "pgd", "--adv-alpha", "2/255"])
    assert adversarial_settings(fixed).alpha_for(1 / 255) == pytest.approx(2 / 255)
    relative = parser.parse_args(["--adv", "pgd", "--adv-alpha", "eps/4", "--adv-warmup-epochs", "2"])
    settings = adversarial_settings(relative)
    assert relative.adv_alpha == "eps/4"
    assert settings.alpha_for(settings.eps_at(0, 0, 4)) == pytest.approx(settings.eps / 8 / 4)
    assert settings.alpha_for(settings.eps) == pytest.approx(4 / 255 / 4)


def test_warm_up_ramps_eps_linearly_from_zero():
    settings = AdvSettings(eps=0.04, warmup_epochs=2)
    ramp = [settings.eps_at(epoch, step, 4) for epoch in range(3) for step in range(4)]
    assert ramp[:8] == pytest.approx([0.04 * (i + 1) / 8 for i in range(8)])
    assert ramp[8:] == [0.04] * 4
    assert AdvSettings(eps=0.04).eps_at(0, 0, 4) == 0.04


# --------------------------------------------------------------------------- inner attacks and losses
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_pgd_at_batches_stay_within_eps_and_differ_from_the_clean_ones(task):
    torch.manual_seed(1)
    if task == "classification":
        model, targets, attack = tiny_classifier(), torch.randint(0, 5, (6,)), "pgd"
    else:
        model, targets, attack = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)), torch.randint(0, 3, (6, 8, 8)), "segpgd"
    images = torch.rand(6, 3, 8, 8)
    model.train()
    stats = [b.clone() for b in model.buffers()]
    eps = 4 / 255
    adv = adversarial_batch(model, images, targets, AdvSettings(kind="pgd", eps=eps, steps=3, attack=attack), eps,
                            num_classes=5 if task == "classification" else 3)
    assert (adv - images).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, images)
    assert model.training, "the model is back in training mode after the inner attack"
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers())), "the attack ran in eval mode"
    assert adversarial_batch(model, images, targets, AdvSettings(kind="pgd"), 0.0, 5) is images


@pytest.mark.parametrize("kind", ["pgd", "trades"])
def test_inner_attacks_under_bf16_autocast_and_channels_last(kind):
    """--amp runs the inner attack under the step's autocast; the images stay fp32 and in their
    memory format, within eps."""
    model, eps = tiny_classifier().to(memory_format=torch.channels_last), 8 / 255
    images = torch.rand(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([0, 1, 2, 3])
    settings = AdvSettings(kind=kind, eps=eps, steps=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if kind == "pgd":
            adv = adversarial_batch(model, images, targets, settings, eps, 5)
            loss = F.cross_entropy(model(adv).float(), targets)
        else:
            loss, _ = trades_loss(model, images, targets, settings, eps, nn.CrossEntropyLoss())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    if kind == "pgd":
        assert adv.dtype == torch.float32 and adv.is_contiguous(memory_format=torch.channels_last)
        assert 0 < (adv - images).abs().max() <= eps + 1e-6


@pytest.mark.parametrize("kind", ["pgd", "trades"])
def test_inner_attacks_under_fp16_autocast_still_step_on_a_confident_model(kind, monkeypatch):
    """--amp on a GPU without bf16 runs the inner attack in fp16: a confident model's input
    gradients underflow there, and without rescaling the images would barely move."""
    import adversarial
    from test_attacks import separable_images
    from test_attacks import tiny_classifier as tiny
    from test_attacks import train as fit

    model = fit(tiny(), *separable_images())
    with torch.no_grad():  # more confident (TRADES' KL also needs fp16 logits that still differ)
        model[-1].weight.mul_(3 if kind == "pgd" else 1)
        model[-1].bias.mul_(3 if kind == "pgd" else 1)
    model.train()
    images, targets = separable_images(n=20, size=32, seed=5)
    eps = 8 / 255
    settings = AdvSettings(kind=kind, eps=eps, steps=3)

    def saturated_fraction() -> float:
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.float16):
            if kind == "pgd":
                adv = adversarial_batch(model, images, targets, settings, eps, 5)
            else:
                atk = adversarial.TRADES(adversarial.for_autocast(model, "cpu"), eps=eps,
                                         alpha=settings.alpha_for(eps), steps=3)
                adv = atk(images)
        assert (adv - images).abs().max() <= eps + 1e-6
        return ((adv - images).abs() >= 0.99 * eps).float().mean().item()

    assert saturated_fraction() > 0.7, "sign steps carry most pixels to the eps boundary (fp32: 0.91 / 0.89)"
    monkeypatch.setattr(adversarial, "for_autocast", lambda model, device_type: model)
    assert saturated_fraction() < 0.3, "without the rescaling most pixels keep their random start"


def test_trades_loss_is_ce_plus_beta_kl_of_the_inner_maximisation():
    model, beta, eps = tiny_classifier(batchnorm=False), 3.0, 8 / 255
    images, targets = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    settings = AdvSettings(kind="trades", eps=eps, steps=2, beta=beta)
    torch.manual_seed(3)
    loss, logits = trades_loss(model, images, targets, settings, eps, nn.CrossEntropyLoss())

    torch.manual_seed(3)  # the same random start: an independent TRADES inner maximisation
    with torch.no_grad():
        clean_probs = model(images).softmax(1)
    adv = images + 0.001 * torch.randn_like(images)
    for _ in range(2):
        adv.requires_grad_(True)
        kl = (clean_probs * (clean_probs.log() - model(adv).log_softmax(1))).sum()
        adv = adv.detach() + settings.alpha_for(eps) * torch.autograd.grad(kl, adv)[0].sign()
        adv = (images + (adv - images).clamp(-eps, eps)).clamp(0, 1)
    clean_logits = model(images)
    ce = -clean_logits.log_softmax(1)[torch.arange(5), targets].mean()
    p = clean_logits.softmax(1)
    kl = (p * (p.log() - model(adv).log_softmax(1))).sum(1).mean()
    assert torch.allclose(logits, clean_logits)
    assert loss.item() == pytest.approx((ce + beta * kl).item(), rel=1e-5)
    assert kl.item() > 1e-6, "the test would not notice a missing KL term"


# --------------------------------------------------------------------------- best.pt
def test_with_adv_best_pt_follows_the_robust_metric():
    assert best_metric_key("classification", "none") == "accuracy"
    assert best_metric_key("classification", "pgd") == "robust_accuracy"
    assert best_metric_key("segmentation", "pgd") == "robust_dice_mean"
    history = [{"epoch": 1, "val_accuracy": 0.8, "val_robust_accuracy": 0.5, "best": True},
               {"epoch": 2, "val_accuracy": 0.9, "val_robust_accuracy": 0.2, "best": False}]
    assert best_row(history, best_metric_key("classification", "pgd"))["epoch"] == 1


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("task,extra", [("classification", ["--adv", "pgd"]),
                                        ("classification", ["--adv", "trades", "--adv-warmup-epochs", "1"]),
                                        ("segmentation", ["--adv", "pgd", "--adv-attack", "segpgd"])],
                         ids=["pgd", "trades", "segpgd"])
def test_one_adversarial_epoch_writes_robust_metrics(task, extra, make_classification_data, make_segmentation_data,
                                                     tmp_path):
    data = make_classification_data(COUNTS) if task == "classification" else make_segmentation_data(SEG_COUNTS)
    out = tmp_path / "run"
    argv = train_argv(data, out, "--task", task, *extra)
    result = train_cli.main(train_cli.get_args_parser().parse_args(argv))
    key = "accuracy" if task == "classification" else "dice_mean"
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert len(rows) == 1 and 0 <= float(rows[0][f"val_robust_{key}"]) <= 1
    assert float(rows[0]["adv_eps"]) == pytest.approx(4 / 255)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics[f"test_robust_{key}"] <= 1 and metrics == pytest.approx(result, nan_ok=True)
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["metrics"][f"robust_{key}"] == float(rows[0][f"val_robust_{key}"])
    assert best["args"]["adv"] == extra[1] and best["args"]["adv_eps"] == pytest.approx(4 / 255)
    assert (out / "Images" / "training_curves.png").stat().st_size > 0

    other = "trades" if extra[1] == "pgd" and task == "classification" else "none"
    changed = [(["--adv", other], f"trained with --adv {extra[1]} but this run has --adv {other}"),
               (["--adv-eps", "8/255"], "--adv-eps 0.0156"), (["--adv-steps", "2"], "--adv-steps 1"),
               (["--adv-val-limit", "2"], "--adv-val-limit 3")]
    for flags, shown in changed:  # each is refused before anything is trained or written
        with pytest.raises(CheckpointError, match=shown):
            train_cli.main(train_cli.get_args_parser().parse_args([*argv, "--epochs", "2", "--resume", *flags]))


# --------------------------------------------------------------------------- bit-exact resume
def _command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", *train_argv(data, out, "--epochs", "2", "--batch-size", "2", "--adv", "pgd",
                                                    "--adv-warmup-epochs", "1", "--adv-steps", "2", "--deterministic",
                                                    "--seed", "5"),
            *extra]


def test_sigkill_mid_epoch_then_resume_with_adv_matches_the_uninterrupted_run(tmp_path, make_classification_data):
    data = make_classification_data(COUNTS)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    uninterrupted = subprocess.Popen(_command(data, full), cwd=ROOT, env=env,  # runs beside the crash
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(_command(data, crashed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = crashed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)  # epoch 1 is written; epoch 2 (or its writes) is under way
    assert proc.poll() is None, "training finished before it could be killed; make the epoch longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert torch.load(last, weights_only=True)["epoch"] == 1

    resumed = subprocess.run(_command(data, crashed, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "at epoch 2" in resumed.stdout
    assert uninterrupted.wait() == 0
    metrics = [json.loads((out / "metrics.json").read_text()) for out in (full, crashed)]
    for m in metrics:
        m.pop("train_seconds")
    assert metrics[0] == metrics[1]
    full_state = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["model"]
    resumed_state = torch.load(last, weights_only=True)["model"]
    assert all(torch.equal(tensor, resumed_state[name]) for name, tensor in full_state.items())
