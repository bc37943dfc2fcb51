"""Bad input: a clear error naming the argument, and running statistics
left exactly as they were."""

import math

import pytest
import torch
from torch import nn

from convbn import ConvBN2d
from conftest import error_type

OPS = torch.ops.convbn


def _good():
    return dict(
        input=torch.randn(2, 4, 6, 6), weight=torch.randn(6, 4, 3, 3), bias=torch.randn(6),
        bn_weight=torch.rand(6) + 0.5, bn_bias=torch.randn(6),
        stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, eps=1e-5,
    )


def _train(**changes):
    a = dict(_good(), **changes)
    return OPS.conv_bn_train(a["input"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"],
                             a["stride"], a["padding"], a["dilation"], a["groups"], a["eps"], True)


BAD_TRAIN_INPUTS = [
    (dict(input=torch.randn(4, 6, 6)), r"`input` of shape .* is 3-D.*takes `input` of shape \(N, C, H, W\).*unsqueeze\(0\)"),
    (dict(weight=torch.randn(6, 4, 3)), r"`weight` of shape"),
    (dict(weight=torch.randn(6, 3, 3, 3)), r"channel mismatch: `input` has 4 channels"),
    (dict(groups=4, weight=torch.randn(6, 1, 3, 3)), r"`groups` \(4\) must divide the number of output channels"),
    (dict(bias=torch.randn(5)), r"`bias`.*6 values"),
    (dict(bn_weight=torch.randn(5)), r"`bn_weight`.*6 values"),
    (dict(bn_bias=torch.randn(6, 1)), r"`bn_bias`.*one value per output channel"),
    (dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), r"`weight` has dtype Double but `input` has dtype Float"),
    (dict(bn_weight=torch.rand(6, dtype=torch.float64)), r"`bn_weight` has dtype Double"),
    (dict(input=torch.randint(0, 5, (2, 4, 6, 6))), r"`input` must be floating point"),
    (dict(input=torch.randn(1, 4, 1, 1), padding=[0, 0], weight=torch.randn(6, 4, 1, 1)),
     r"Expected more than 1 value per channel when training"),
    (dict(input=torch.randn(0, 4, 6, 6)), r"empty batch"),
    (dict(stride=[0, 1]), r"`stride` must be positive"),
    (dict(dilation=[1, -1]), r"`dilation` must be positive"),
    (dict(padding=[-1, 0]), r"`padding` must be non-negative"),
    (dict(eps=0.0), r"`eps` must be a positive finite number"),
    (dict(eps=math.nan), r"`eps` must be a positive finite number"),
    (dict(input=torch.randn(2, 4, 2, 2), padding=[0, 0]), r"convolution output would be empty"),
    (dict(groups=0), r"`groups` must be positive"),
]


@pytest.mark.parametrize("changes,message", BAD_TRAIN_INPUTS, ids=lambda v: str(v)[:40] if isinstance(v, str) else None)
def test_train_op_rejects_bad_input(changes, message):
    with pytest.raises(error_type(message), match=message):
        _train(**changes)


def test_device_mismatch_is_named():
    # A meta tensor stands in for "another device" on a machine with one device.
    with pytest.raises(RuntimeError, match=r"`weight` is on meta but `input` is on cpu"):
        _train(weight=torch.randn(6, 4, 3, 3, device="meta"))


def test_running_stats_on_another_device_are_named_and_untouched():
    running_var, nbt = torch.ones(6), torch.tensor(2)
    with pytest.raises(RuntimeError, match=r"`running_mean` is on meta"):
        OPS.update_running_stats(torch.zeros(6, device="meta"), running_var, nbt, torch.randn(6),
                                 torch.rand(6) + 0.5, 1e-5, 0.1, 50)
    assert torch.equal(running_var, torch.ones(6)) and nbt.item() == 2


def _stats():
    return torch.randn(6), torch.rand(6) + 0.5, torch.tensor(7)


@pytest.mark.parametrize("changes,message", [
    (dict(momentum=math.inf), r"`momentum` must be a finite number"),
    (dict(momentum=math.nan), r"`momentum` must be a finite number"),
    (dict(eps=-1.0), r"`eps` must be a positive finite number"),
    (dict(count=1), r"Expected more than 1 value per channel"),
    (dict(running_var=torch.ones(5)), r"`running_var`.*6 values"),
    (dict(running_mean=torch.zeros(6, dtype=torch.long)), r"`running_mean` must be floating point"),
    (dict(num_batches_tracked=torch.tensor(1.0)), r"`num_batches_tracked` must be an integer tensor"),
])
def test_update_running_stats_rejects_bad_input_and_writes_nothing(changes, message):
    running_mean, running_var, nbt = _stats()
    args = dict(running_mean=running_mean, running_var=running_var, num_batches_tracked=nbt,
                save_mean=torch.randn(6), save_invstd=torch.rand(6) + 0.5, eps=1e-5, momentum=0.1, count=50)
    args.update(changes)
    before = [t.clone() for t in (args["running_mean"], args["running_var"], args["num_batches_tracked"])]
    with pytest.raises(error_type(message), match=message):
        OPS.update_running_stats(*args.values())
    for b, t in zip(before, (args["running_mean"], args["running_var"], args["num_batches_tracked"])):
        assert torch.equal(b, t)


def _module_and_state():
    m = ConvBN2d(4, 6, 3, padding=1, bias=True)
    with torch.no_grad():
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 1.5)
        m.num_batches_tracked.fill_(3)
    return m, {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("bad_input,message", [
    (torch.randn(1, 4, 1, 1), r"Expected more than 1 value per channel when training"),
    (torch.randn(2, 3, 5, 5), r"channel mismatch"),
    (torch.randn(2, 4, 5, 5, dtype=torch.float64), r"dtype"),
])
def test_module_error_leaves_statistics_untouched(bad_input, message):
    m, state = _module_and_state()
    m.train()
    with pytest.raises(error_type(message), match=message):
        m(bad_input)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_module_takes_an_empty_batch_as_nn_does():
    # The operator refuses an empty batch (above); the module and the
    # functional form do what the nn pair does: an empty output, zero
    # gradients, the statistics as they were and the batch counted.
    m, state = _module_and_state()
    conv, bn = m.to_modules()
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    out, ref = m.train()(x), bn.train()(conv(x))
    assert out.shape == ref.shape == (0, 6, 5, 5)
    out.sum().backward()
    assert m.weight.grad.eq(0).all() and m.bn_weight.grad.eq(0).all()
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert m.num_batches_tracked.item() == bn.num_batches_tracked.item() == 4


def test_module_rejects_wrong_rank_and_bad_hyper_parameters():
    m, _ = _module_and_state()
    with pytest.raises(ValueError, match=r"4-D input.*unsqueeze\(0\)"):
        m(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match=r"momentum"):
        ConvBN2d(4, 6, 3, momentum=math.nan)
    with pytest.raises(ValueError, match=r"eps"):
        ConvBN2d(4, 6, 3, eps=0.0)
    with pytest.raises(ValueError, match=r"divisible by groups"):
        ConvBN2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match=r"'same' is not supported for strided"):
        ConvBN2d(4, 6, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match=r"padding_mode"):
        ConvBN2d(4, 6, 3, padding_mode="mirror")


def test_eval_op_rejects_bad_running_stats():
    a = _good()
    with pytest.raises(RuntimeError, match=r"`running_var`.*6 values"):
        OPS.conv_bn_eval(a["input"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"],
                         torch.zeros(6), torch.ones(4), [1, 1], [1, 1], [1, 1], 1, 1e-5)


def test_from_modules_rejects_mismatched_pair():
    with pytest.raises(ValueError, match=r"num_features=5"):
        ConvBN2d.from_modules(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match=r"nn.Conv2d"):
        ConvBN2d.from_modules(nn.Conv1d(3, 6, 3), nn.BatchNorm2d(6))
