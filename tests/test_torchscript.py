"""The operators are callable from TorchScript (scripted functions). Scripting
the ConvBN2d module itself is the deployment issue's work."""

import pytest
import torch
import torch.nn.functional as F


def _script(fn):
    try:
        return torch.jit.script(fn)
    except Exception as error:  # TorchScript is deprecated and may be disabled
        pytest.skip(f"this torch refuses torch.jit.script: {error}")


def _train_then_eval(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
                     rm: torch.Tensor, rv: torch.Tensor):
    out, mean, invstd, _ = torch.ops.convbn.conv_bn_train(x, w, None, g, b, [1, 1], [1, 1], [1, 1], 1, 1e-5, True)
    n = out.size(0) * out.size(2) * out.size(3)
    nbt = torch.zeros([], dtype=torch.long)
    torch.ops.convbn.update_running_stats(rm, rv, nbt, mean, invstd, 1e-5, 0.1, n)
    return out, torch.ops.convbn.conv_bn_eval(x, w, None, g, b, rm, rv, [1, 1], [1, 1], [1, 1], 1, 1e-5)


def test_scripted_function_calls_the_ops():
    scripted = _script(_train_then_eval)
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
