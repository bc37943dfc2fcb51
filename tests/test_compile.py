"""torch.compile(fullgraph=True) on a model holding ConvBN2d: no graph
breaks (fullgraph raises on one), the same numbers as eager, in train and
eval, and close to the float64 pair; a varying batch size compiles once more,
with a symbolic batch dimension, and not again for every new size.

The convbn operators are opaque to Inductor, so what they compute is
bit-identical to eager: training outputs, running statistics and
num_batches_tracked. Inductor generates its own code for the ATen ops around
them, which may sum in another order: F.pad's backward (reflect padding, an
odd 'same') and the eval fold (CompositeImplicitAutograd, so decomposed into
ATen ops). Those results are compared to float64 rounding (EXACT_TO)."""

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import assert_close_to_reference
from deploy_helpers import (
    EXACT_TO, assert_same_state, assert_state_close_to_pair, assert_within, batch, convbn_net,
    convbn_net_with_statistics, pair_twin, train_step, zero_grads,
)

BATCH_SIZES = (4, 5, 6, 7)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(net):
    counter = CompileCounterWithBackend("inductor")
    return torch.compile(net, fullgraph=True, backend=counter), counter


def _assert_compiled_once_per_shape_kind(frames):
    # The first size compiles a graph for that size; the second a graph with a
    # symbolic batch size, which every later size reuses.
    assert frames[1] <= 2, f"compiled frames after each batch size: {frames}"
    assert frames[-1] == frames[1], f"recompiled for a new batch size: {frames}"


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["memory_efficient", "save_output"])
def test_compiled_training_matches_eager(memory_efficient):
    eager = convbn_net(memory_efficient)
    twin = pair_twin(eager)
    net = copy.deepcopy(eager)
    compiled, counter = _compile(net)
    frames = []
    for n in BATCH_SIZES:
        x, grad = batch(n)
        y_compiled, gx_compiled = train_step(compiled, x, grad)
        y_eager, gx_eager = train_step(eager, x, grad)
        y_pair, gx_pair = train_step(twin, x, grad)
        frames.append(counter.frame_count)
        torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
        assert_within(gx_compiled, gx_eager, EXACT_TO, "input grad")
        assert_same_state(net, eager, grad_tol=EXACT_TO)
        assert_close_to_reference(y_compiled, y_pair, torch.float64, f"output (batch {n})")
        assert_close_to_reference(gx_compiled, gx_pair, torch.float64, f"input grad (batch {n})")
        assert_state_close_to_pair(net, twin)
        zero_grads(net, eager, twin)
    assert int(net[0].num_batches_tracked) == len(BATCH_SIZES)
    _assert_compiled_once_per_shape_kind(frames)


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
def test_compiled_eval_matches_eager(grad_mode):
    eager = convbn_net_with_statistics()
    twin = pair_twin(eager)
    net = copy.deepcopy(eager)
    for model in (eager, twin, net):
        model.eval()
    compiled, counter = _compile(net)
    frames = []
    with torch.set_grad_enabled(grad_mode):
        for n in BATCH_SIZES:
            x, _ = batch(n, seed=100 + n)
            y_compiled, y_eager, y_pair = compiled(x), eager(x), twin(x)
            frames.append(counter.frame_count)
            assert_within(y_compiled, y_eager, EXACT_TO, "eval output")
            assert_close_to_reference(y_compiled.detach(), y_pair.detach(), torch.float64, f"eval output (batch {n})")
    assert_same_state(net, eager)  # eval leaves the statistics alone
    _assert_compiled_once_per_shape_kind(frames)
