"""convbn emits no warnings of its own (deprecation or other) on the paths
users call: import, the modules in train and eval, the functional forms,
fuse/unfuse, recalibrate, convert_sync_batchnorm, build_info, torch.export
and torch.compile of a fused model. Warnings torch raises from its own code
(its TorchScript deprecation inside Inductor, for one) are torch's; any
warning attributed to a convbn file, or naming convbn, is ours."""

import copy
import os
import subprocess
import sys
import warnings

import torch
from torch import nn

import convbn

PACKAGE_DIR = os.path.dirname(os.path.abspath(convbn.__file__))


def ours(caught):
    return [w for w in caught
            if os.path.abspath(w.filename).startswith(PACKAGE_DIR) or "convbn" in str(w.message)]


def test_import_emits_no_warning():
    code = "import warnings; warnings.simplefilter('error'); import convbn"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_user_paths_emit_no_warning_of_convbns():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5), nn.BatchNorm1d(5))
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = convbn.fuse(copy.deepcopy(model))
        fused(x).sum().backward()
        convbn.recalibrate(fused, [x], progress=False)
        fused.eval()
        fused(x)
        convbn.unfuse(copy.deepcopy(fused))
        convbn.convert_sync_batchnorm(copy.deepcopy(fused))
        layer = convbn.ConvBN2d(3, 4, 3, padding="same", padding_mode="reflect")
        layer(x).sum().backward()
        convbn.functional.conv_bn(x, layer.weight, training=True)
        exported = torch.export.export(fused, (x,))
        exported.run_decompositions().module()(x)
        torch.compile(fused, fullgraph=True)(x)
        convbn.build_info()
    assert not ours(caught), [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in ours(caught)]
