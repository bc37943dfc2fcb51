import pytest
import torch

import convbn  # noqa: F401  (loads torch.ops.convbn)

# Tolerances against a float64 reference, relative to the reference's scale.
# float64 differs only by summation order. For float32/bfloat16 they are the
# floor of assert_as_accurate_as_pair: batch-norm gradients sum values that
# nearly cancel (a depthwise 1x1 conv's weight grad is exactly zero, so both
# implementations return pure rounding noise), so the fair bar is the pair's
# own error in that dtype; a real bug is off by O(1) of the reference's scale.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def assert_close_to_reference(actual, expected, dtype, name=""):
    """actual (computed in dtype) against expected (float64), with an absolute
    tolerance scaled by the reference's largest magnitude."""
    tol = TOLERANCE[dtype]
    expected = expected.double()
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected, rtol=tol, atol=tol * scale,
        msg=lambda m: f"{name}: {m}",
    )


def assert_as_accurate_as_pair(actual, pair, expected, dtype, name=""):
    """For low-precision dtypes: actual's error against the float64 reference
    is within five times the error of nn.Conv2d + nn.BatchNorm2d run in the same
    dtype (`pair`), plus a floor of TOLERANCE[dtype] relative to the
    reference's scale."""
    expected = expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual.double() - expected).abs().max().item()
    pair_err = (pair.double() - expected).abs().max().item()
    bound = 5 * pair_err + TOLERANCE[dtype] * scale
    assert err <= bound, f"{name}: error {err:.4g} > {bound:.4g} (the {dtype} pair's error is {pair_err:.4g})"


def error_type(message):
    """The exception nn raises for the error whose message matches
    `message`: ValueError for too few values per channel in training (as
    F.batch_norm), RuntimeError for convbn's other argument checks."""
    return ValueError if "more than 1 value per channel" in message else RuntimeError


def randomize_batch_norms(model, bias_std=0.2, mean_std=0.5):
    """model with non-trivial batch norm parameters and statistics (every
    nn.BatchNorm, of any class), so that a mix-up of any two shows."""
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, bias_std)
                if m.track_running_stats:
                    m.running_mean.normal_(0, mean_std)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(3)
    return model


def nn_activation(name, slope=0.01):
    """The nn module for an operator activation name, built here (not by
    convbn), for references."""
    from torch import nn

    return {
        "identity": lambda: nn.Identity(), "relu": lambda: nn.ReLU(), "relu6": lambda: nn.ReLU6(),
        "leaky_relu": lambda: nn.LeakyReLU(slope), "silu": lambda: nn.SiLU(), "hardswish": lambda: nn.Hardswish(),
        "sigmoid": lambda: nn.Sigmoid(), "gelu": lambda: nn.GELU(),
    }[name]()


def saved_tensors(fn):
    """(fn()'s output, [the tensors autograd saved for backward]), each
    non-empty storage once."""
    saved = {}

    def pack(t):
        if t.numel():
            saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(saved.values())


def nbytes(tensors):
    return sum(t.untyped_storage().nbytes() for t in tensors)


def assert_same_as_unfused(fused, original, inputs, steps=2, seed=0):
    """A fused model against its unfused original: both trained `steps` SGD
    steps from the same state (the same RNG for dropout and stochastic
    depth): outputs, input and parameter grads (by state_dict name; one is
    None where the other is), every state_dict entry (running statistics
    included); then eval outputs with grad and under no_grad."""
    from torch import nn

    assert list(fused.state_dict()) == list(original.state_dict())
    opt_a = torch.optim.SGD(original.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(fused.parameters(), lr=0.1)
    original.train(), fused.train()
    for step in range(steps):
        xa, xb = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
        torch.manual_seed(seed + step)
        out_a = original(xa)
        torch.manual_seed(seed + step)
        out_b = fused(xb)
        torch.testing.assert_close(out_b, out_a, msg=lambda m: f"train output, step {step}: {m}")
        g = torch.randn_like(out_a)
        out_a.backward(g), out_b.backward(g)
        torch.testing.assert_close(xb.grad, xa.grad)
        params_b = fused.state_dict(keep_vars=True)
        for name, p in original.state_dict(keep_vars=True).items():
            if isinstance(p, nn.Parameter):
                assert (params_b[name].grad is None) == (p.grad is None), name
                if p.grad is not None:
                    torch.testing.assert_close(params_b[name].grad, p.grad, msg=lambda m: f"grad {name}: {m}")
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    for name, value in original.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, msg=lambda m: f"{name}: {m}")
    original.eval(), fused.eval()
    torch.testing.assert_close(fused(inputs), original(inputs))
    with torch.no_grad():
        torch.testing.assert_close(fused(inputs), original(inputs))


CUDA_REASON = "no CUDA device here: CUDA tests run on a GPU machine (bash scripts/gpu_check.sh)"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=requires_cuda)])
def device(request):
    """Runs a test on the CPU and, where there is one, on a CUDA device."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tf32_off():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


def pytest_configure(config):
    _tf32_off()  # before any fixture of any scope (see below)


@pytest.fixture(autouse=True)
def _float32_convolutions_in_float32():
    """cuDNN runs float32 convolutions in TF32 by default
    (torch.backends.cudnn.allow_tf32): their inputs rounded to a 10-bit
    mantissa, about 1e-3 relative, as far from the float64 references as
    TOLERANCE[float32] is ten times over, for nn's pair as for convbn. The
    tests check float32 arithmetic, so they turn TF32 off (convolutions and
    matmuls) for the session and again after each test; tests/test_cuda.py
    checks convbn under TF32 against nn's pair under TF32, like with like.
    Without a GPU the flags change nothing."""
    _tf32_off()
    yield
    _tf32_off()  # (a test that turned it on, as test_cuda's TF32 test does)
