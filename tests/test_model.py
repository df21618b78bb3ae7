"""Model shapes for every depth and odd input sizes, and the built-in Normalize layer."""
import pytest
import torch
from torch import nn

from model import DEPTHS, Normalize, UResNet, build_model, fold_batchnorm
from utils import UsageError


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_every_depth_runs_forward_and_backward(task, depth):
    torch.manual_seed(0)
    num_classes = 5 if task == "classification" else 3
    model = build_model(task, depth, num_classes)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    expected = (2, 5) if task == "classification" else (2, 3, 32, 32)
    assert out.shape == expected
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("size", [(45, 61), (120, 116), (33, 97), (64, 64), (17, 17)])
def test_uresnet_returns_logits_at_input_resolution(size):
    model = UResNet(18).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, *size)


def test_uresnet_decoder_uses_bottleneck_blocks_from_depth_50():
    from torchvision.models.resnet import BasicBlock, Bottleneck
    assert isinstance(UResNet(18).decoder[0].block, BasicBlock)
    assert isinstance(UResNet(50).decoder[0].block, Bottleneck)


def test_normalize_layer_standardises_per_channel():
    norm = Normalize([0.5, 0.25, 0.0], [0.5, 0.25, 2.0])
    x = torch.tensor([1.0, 0.5, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x).flatten(), torch.tensor([1.0, 1.0, 0.5]))


def test_models_start_with_normalize_and_store_its_stats():
    model = build_model("classification", 18, 5, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    assert isinstance(model.normalize, Normalize)
    state = model.state_dict()
    assert torch.allclose(state["normalize.mean"].flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(state["normalize.std"].flatten(), torch.tensor([0.4, 0.5, 0.6]))


def test_normalize_changes_predictions_so_it_is_really_applied():
    torch.manual_seed(0)
    a = build_model("classification", 18, 5).eval()
    b = build_model("classification", 18, 5, mean=[0.9, 0.9, 0.9], std=[0.1, 0.1, 0.1]).eval()
    b.net.load_state_dict(a.net.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize("task,depth", [("detection", 18), ("classification", 20)])
def test_unknown_task_or_depth_is_a_usage_error(task, depth):
    with pytest.raises(UsageError):
        build_model(task, depth, 5)


def with_random_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """Batch norms far from identity, so a missed or wrong fold shows in the logits."""
    gen = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, low, high in ((module.running_mean, -0.5, 0.5), (module.running_var, 0.3, 3.0),
                                      (module.weight.data, 0.5, 1.5), (module.bias.data, -0.3, 0.3)):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * (high - low) + low)
    return model.eval()


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_folding_batchnorm_removes_every_batchnorm_and_keeps_the_function(task, depth):
    torch.manual_seed(0)
    model = with_random_batchnorm_statistics(build_model(task, depth, 5 if task == "classification" else 3))
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == batchnorms > 0  # original untouched
    x = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert not any(p.requires_grad for p in folded.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_folding_batchnorm_gives_the_same_input_gradient_as_the_original():
    torch.manual_seed(0)
    model = with_random_batchnorm_statistics(build_model("classification", 18, 5))
    x = torch.rand(2, 3, 32, 32)
    grads = []
    for net in (model, fold_batchnorm(model)):
        xx = x.clone().requires_grad_(True)
        net(xx)[:, 1].sum().backward()
        grads.append(xx.grad)
    assert torch.allclose(grads[1], grads[0], rtol=1e-3, atol=1e-4 * grads[0].abs().max().item())
