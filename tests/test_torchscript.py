"""TorchScript: the operators from scripted functions; models holding
ConvBN2d scripted, saved and reloaded in Python, in train and eval mode; and
a saved model run by the C++ program examples/cpp/jit_infer.cpp
(torch::jit::load, no Python in that process).

TorchScript is deprecated: where this torch refuses torch.jit.script, the
tests skip and say so."""

import copy
import subprocess
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_to_reference
from cpp_programs import cpp_program, run_cpp_program
from deploy_helpers import (
    assert_matches_eval_net, assert_same_state, assert_state_close_to_pair, batch, convbn_net,
    convbn_net_with_statistics, pair_twin, train_step, zero_grads,
)

pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:torch\.jit")


def _probe(x: torch.Tensor) -> torch.Tensor:
    return x + 1


def script(obj):
    """torch.jit.script(obj); skips the test, saying why, where this torch
    refuses TorchScript altogether. Failing to script obj fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.script(_probe)
    except Exception as error:
        pytest.skip(f"torch {torch.__version__} refuses torch.jit.script: {error}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(obj)


def _train_then_eval(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
                     rm: torch.Tensor, rv: torch.Tensor):
    out, mean, invstd, _ = torch.ops.convbn.conv_bn_train(x, w, None, g, b, [1, 1], [1, 1], [1, 1], 1, 1e-5, True)
    n = out.size(0) * out.size(2) * out.size(3)
    nbt = torch.zeros([], dtype=torch.long)
    torch.ops.convbn.update_running_stats(rm, rv, nbt, mean, invstd, 1e-5, 0.1, n)
    return out, torch.ops.convbn.conv_bn_eval(x, w, None, g, b, rm, rv, [1, 1], [1, 1], [1, 1], 1, 1e-5)


def test_scripted_function_calls_the_ops():
    scripted = script(_train_then_eval)
    x, w = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    g, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out, out_eval = scripted(x, w, g, b, rm, rv)
    y = F.conv2d(x, w, None, 1, 1)
    torch.testing.assert_close(out, F.batch_norm(y, rm_ref, rv_ref, g, b, True, 0.1, 1e-5))
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)
    torch.testing.assert_close(out_eval, F.batch_norm(y, rm_ref, rv_ref, g, b, False, 0.1, 1e-5))


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["memory_efficient", "save_output"])
def test_scripted_model_trains_and_evaluates_like_eager_and_the_pair(memory_efficient):
    eager = convbn_net(memory_efficient)
    twin = pair_twin(eager)
    scripted = script(copy.deepcopy(eager))  # scripting shares tensors: script a copy

    for step in range(3):
        x, grad = batch(4 + step)
        y_scripted, gx_scripted = train_step(scripted, x, grad)
        y_eager, gx_eager = train_step(eager, x, grad)
        y_pair, gx_pair = train_step(twin, x, grad)
        # The same operators in the same order: bit-identical to eager.
        torch.testing.assert_close(y_scripted, y_eager, rtol=0, atol=0)
        torch.testing.assert_close(gx_scripted, gx_eager, rtol=0, atol=0)
        assert_same_state(scripted, eager)
        assert_close_to_reference(y_scripted, y_pair, torch.float64, f"output (step {step})")
        assert_close_to_reference(gx_scripted, gx_pair, torch.float64, f"input grad (step {step})")
        assert_state_close_to_pair(scripted, twin)
        zero_grads(scripted, eager, twin)

    for net in (scripted, eager, twin):
        net.eval()
    x, _ = batch(3)
    with torch.no_grad():
        y_eager, y_pair = eager(x), twin(x)
        torch.testing.assert_close(scripted(x), y_eager, rtol=0, atol=0)
    torch.testing.assert_close(scripted(x).detach(), y_eager, rtol=0, atol=0)
    assert_close_to_reference(scripted(x).detach(), y_pair, torch.float64, "eval output")


def test_saved_scripted_model_reloads_with_the_same_behaviour(tmp_path):
    scripted = script(convbn_net())
    train_step(scripted, *batch(4))
    path = tmp_path / "net.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    assert loaded.training
    zero_grads(scripted)  # grads are not saved
    assert_same_state(loaded, scripted)

    x, grad = batch(5)
    y_loaded, gx_loaded = train_step(loaded, x, grad)
    y_scripted, gx_scripted = train_step(scripted, x, grad)
    torch.testing.assert_close(y_loaded, y_scripted, rtol=0, atol=0)
    torch.testing.assert_close(gx_loaded, gx_scripted, rtol=0, atol=0)
    assert_same_state(loaded, scripted)
    assert int(getattr(loaded, "0").num_batches_tracked) == 2

    loaded.eval()
    scripted.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), scripted(x), rtol=0, atol=0)


def test_scripted_model_reports_a_bad_input_like_eager():
    scripted = script(convbn_net())
    with pytest.raises(Exception, match=r"expected a 4-D input.*unsqueeze\(0\)"):
        scripted(torch.randn(3, 12, 12, dtype=torch.float64))
    assert int(getattr(scripted, "0").num_batches_tracked) == 0


def test_cpp_program_runs_the_saved_model_like_python(tmp_path):
    net = convbn_net_with_statistics(torch.float32)
    # Saved in train mode: the program switches the model to eval itself.
    torch.jit.save(script(copy.deepcopy(net)), str(tmp_path / "net.pt"))
    x, y = run_cpp_program("convbn_jit_infer", tmp_path / "net.pt", (3, 3, 12, 12), tmp_path / "out.pt",
                           "--seed", "7")
    assert_matches_eval_net(y, x, net.eval())


def test_cpp_program_explains_a_bad_command_line():
    result = subprocess.run([str(cpp_program("convbn_jit_infer")), "model.pt", "2", "x"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "input sizes must be positive integers, got x" in result.stderr
    assert "usage:" in result.stderr
