"""convbn.fuse on whole networks (ResNet-18, ResNet-50 with torchvision's
structure, d2l's LeNet-BN): every pair replaced, the fused model's
state_dict has exactly the original's keys (checkpoints load both ways as
they are, and unfuse gives back the original's layout), and the same outputs, gradients and running statistics as the
original in train and eval, in float64."""

import copy

import pytest
import torch
from torch import nn

import convbn
from conftest import assert_close_to_reference, randomize_batch_norms

F64 = torch.float64
def assert_same_training(original, fused, batches):
    """A few SGD steps on both: outputs, input grads, every parameter grad
    and every buffer match; then eval outputs (with and without grad)."""
    opt_a = torch.optim.SGD(original.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(fused.parameters(), lr=0.05)
    fused_params = fused.state_dict(keep_vars=True)  # the original's names
    for step, x in enumerate(batches):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = original(xa), fused(xb)
        assert_close_to_reference(out_b, out_a, F64, f"train output, step {step}")
        grad = torch.randn_like(out_a)
        out_a.backward(grad)
        out_b.backward(grad)
        assert_close_to_reference(xb.grad, xa.grad, F64, "input grad")
        for name, p in original.named_parameters():
            assert_close_to_reference(fused_params[name].grad, p.grad, F64, f"grad of {name}")
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    fused_state = fused.state_dict()
    assert list(fused_state) == list(original.state_dict())
    for name, value in original.state_dict().items():
        assert_close_to_reference(fused_state[name], value, F64, name)
    original.eval()
    fused.eval()
    x = batches[0]
    assert_close_to_reference(fused(x), original(x), F64, "eval output")
    with torch.no_grad():
        assert_close_to_reference(fused(x), original(x), F64, "eval output, no grad")


@pytest.mark.parametrize("arch,pairs,size", [("resnet18", 20, 64), ("resnet50", 53, 64)])
def test_resnet_fuse_train_eval_and_state_dicts(arch, pairs, size):
    torch.manual_seed(0)
    original = getattr(convbn.models, arch)(num_classes=10).double()
    randomize_batch_norms(original)
    fused = convbn.fuse(original)
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(convbn.ConvBN2d) == pairs
    assert nn.Conv2d not in kinds and nn.BatchNorm2d not in kinds
    assert isinstance(fused.get_submodule("layer1.0.conv1"), convbn.ConvBN2d)
    assert isinstance(fused.get_submodule("layer2.0.downsample.0"), convbn.ConvBN2d)

    # The fused model loads the original's state_dict (and its own), key for key.
    fresh = convbn.fuse(getattr(convbn.models, arch)(num_classes=10).double())
    fresh.load_state_dict(original.state_dict())
    assert list(fresh.state_dict()) == list(original.state_dict())
    for name, value in original.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    fresh.load_state_dict(fused.state_dict())

    batches = [torch.randn(4, 3, size, size, dtype=F64) for _ in range(2)]
    assert_same_training(copy.deepcopy(original), fresh, batches)

    # And back: the original loads the unfused model's state_dict.
    unfused = convbn.unfuse(fresh)
    assert not any(isinstance(m, convbn.ConvBN2d) for m in unfused.modules())
    assert set(unfused.state_dict()) == set(original.state_dict())
    target = getattr(convbn.models, arch)(num_classes=10).double()
    target.load_state_dict(unfused.state_dict())
    target.eval()
    x = torch.randn(2, 3, size, size, dtype=F64)
    assert_close_to_reference(target(x), fresh(x), F64, "original loaded from unfuse")
    unfused.train()
    target.train()
    assert_close_to_reference(unfused(x), target(x), F64, "unfused model trains like the original")


def test_lenet_fuses_conv_and_linear_pairs():
    torch.manual_seed(0)
    original = convbn.models.lenet_bn().double()
    randomize_batch_norms(original)
    fused = convbn.fuse(original)
    assert isinstance(fused, nn.Sequential)  # Sequential fusions keep the model's class
    kinds = [type(m).__name__ for m in fused]
    assert kinds.count("ConvBN2d") == 2 and kinds.count("LinearBN1d") == 2
    assert "BatchNorm1d" not in kinds and "BatchNorm2d" not in kinds
    assert_same_training(copy.deepcopy(original), fused,
                         [torch.rand(8, 1, 28, 28, dtype=F64) for _ in range(3)])

    fresh = convbn.fuse(convbn.models.lenet_bn().double())
    fresh.load_state_dict(original.state_dict())
    back = convbn.models.lenet_bn().double()
    back.load_state_dict(convbn.unfuse(fresh).state_dict())
    for name, value in original.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_linear_bn_pair_outside_sequential_is_fused_by_tracing():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)
            self.norm = nn.BatchNorm1d(5)
            self.out = nn.Linear(5, 2)

        def forward(self, x):
            return self.out(torch.relu(self.norm(self.fc(x))))

    original = Head().double()
    fused = convbn.fuse(original)
    assert isinstance(fused, Head)
    assert isinstance(fused.fc, convbn.LinearBN1d)
    assert isinstance(fused.norm, convbn.FusedBatchNormSlot) and fused.norm.fused is fused.fc
    assert_same_training(copy.deepcopy(original), fused,
                         [torch.randn(7, 6, dtype=F64) for _ in range(2)])
    restored = convbn.unfuse(fused)
    assert isinstance(restored.norm, nn.BatchNorm1d) and isinstance(restored.fc, nn.Linear)
    Head().double().load_state_dict(restored.state_dict())


def test_unfuse_of_a_hand_written_module_gives_a_sequential():
    model = nn.Sequential(convbn.ConvBN2d(3, 4, 3), nn.ReLU())
    unfused = convbn.unfuse(model)
    assert isinstance(unfused[0], nn.Sequential)
    assert isinstance(unfused[0][0], nn.Conv2d) and isinstance(unfused[0][1], nn.BatchNorm2d)
    model.eval()
    unfused.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(unfused(x), model(x))
