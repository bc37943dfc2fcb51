"""The GPU benchmarks, run here on the CPU at toy sizes, so that a GPU
session (rare, 30 minutes) never spends a call on a Python error: each
script runs end to end, its correctness check catches a broken contender,
the plot is drawn from a log, and the kernel names of the bandwidth
section are read as intended. (Speed is measured by the scripts, never by
tests.)"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import convbn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import bench_gpu  # noqa: E402
import bench_gpu_networks  # noqa: E402


def run_script(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, *args], cwd=BENCHMARKS, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_layer_benchmark_runs_and_plots_from_its_log(tmp_path):
    pytest.importorskip("matplotlib")
    markdown, log, png = tmp_path / "results.md", tmp_path / "bench.log", tmp_path / "layers.png"
    out = run_script("bench_gpu.py", "--device", "cpu", "--batch", "2", "--shapes", "3", "--repeats", "1",
                     "--dtypes", "float32,bfloat16", "--layouts", "channels_last", "--markdown", str(markdown))
    log.write_text(out)
    rows = [line for line in out.splitlines() if line.startswith("ROW ")]
    assert len(rows) == 6  # 3 shapes x 2 dtypes
    text = markdown.read_text()
    assert "### float32, channels_last" in text and "### bfloat16, channels_last" in text
    assert text.count("| stem 7x7/2 |") == 2
    run_script("bench_gpu.py", "--plot-from", str(log), "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("broken", ["output", "input gradient", "one channel"])
def test_layer_check_refuses_a_wrong_contender(broken):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
    contenders = bench_gpu.make_contenders(conv, bn, use_compile=False)
    x = torch.randn(4, 8, 12, 12, requires_grad=True)
    grad = torch.randn(4, 64, 12, 12)
    assert bench_gpu.check_contenders(contenders, contenders["eager pair"], x, grad, "as built") == {}

    class WrongGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    fused = contenders["convbn save-output"]
    if broken == "input gradient":
        wrong = nn.Sequential(fused)
        wrong.register_forward_pre_hook(lambda m, args: (WrongGradient.apply(args[0]),))
    else:
        with torch.no_grad():
            if broken == "output":
                fused.bn_weight.mul_(1.01)  # 1% off
            else:
                fused.bn_bias[3] += 0.05  # one channel of 64: 0.1% of the whole output's norm
        wrong = fused
    contenders["convbn save-output"] = wrong
    failures = bench_gpu.check_contenders(contenders, contenders["eager pair"], x, grad, "broken")
    assert list(failures) == ["convbn save-output"]
    assert f"broken, convbn save-output, {'input gradient' if broken == 'input gradient' else 'output'}" in \
        failures["convbn save-output"]


def test_network_benchmark_runs_and_checks_its_contenders(tmp_path):
    markdown = tmp_path / "results.md"
    run_script("bench_gpu_networks.py", "--device", "cpu", "--batch", "4", "--size", "96", "--check-batch", "4",
               "--repeats", "1", "--frozen-batch", "2", "--no-compile", "--bandwidth-shapes", "l4 3x3 512-512",
               "--bandwidth-batch", "2", "--markdown", str(markdown))
    text = markdown.read_text()
    assert "### ResNet-50 training step: batch 4 at 96 px, bfloat16 autocast" in text
    assert "FAILED" not in text
    assert "### Frozen-BN fine-tuning" in text and "### Batch-norm passes alone" in text
    assert text.count("| l4 3x3 512-512 |") == 4  # 2 layouts x 2 modes (no CUDA kernel here: no figures)
    for contender in ("eager", "convbn memory-efficient", "convbn save-output", "convbn"):
        assert f"| {contender} |" in text


def test_network_check_refuses_a_wrong_contender():
    """bfloat16 through 50 batch norms is far from float64 (the eager model
    too), so the check also runs the eager contenders in float32: the last
    layer's batch-norm weight 1% off is caught there."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    reference = convbn.models.resnet50()
    trainers = {c: bench_gpu_networks.Trainer(
        bench_gpu_networks.make_model(c, reference, device, torch.channels_last, True), torch.bfloat16, device)
        for c in ("eager", "convbn memory-efficient")}
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (4,))
    last = [m for m in trainers["convbn memory-efficient"].model.modules() if isinstance(m, convbn.ConvBN2d)][-1]
    with torch.no_grad():
        last.bn_weight.mul_(1.01)
    with pytest.raises(AssertionError, match=r"float32 check\), convbn memory-efficient, output"):
        bench_gpu_networks.measure_steps(reference, trainers, x, target, 1, 4, torch.bfloat16, "broken")


def test_compiled_fused_network_trains_under_autocast():
    """The "compile convbn" contender's path (torch.compile of a fused
    model, bfloat16 autocast, channels_last, SGD steps) on a small network:
    its output after two steps matches the uncompiled fused model's."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (4,))
    trainers = {c: bench_gpu_networks.Trainer(
        bench_gpu_networks.make_model(c, reference, device, torch.channels_last, True), torch.bfloat16, device)
        for c in ("convbn memory-efficient", "compile convbn")}
    assert isinstance(trainers["compile convbn"].model._orig_mod[0], convbn.ConvBN2d)
    for trainer in trainers.values():
        trainer.step(x, target), trainer.step(x, target)
    with torch.no_grad():
        ours, theirs = (trainers[c].forward(x).float() for c in ("compile convbn", "convbn memory-efficient"))
    torch.testing.assert_close(ours, theirs, rtol=3e-2, atol=3e-2 * theirs.abs().max().item())


# Kernel names as the CUDA profiler (CUPTI) demangles them.
def _name(kernel, args):
    return f"void convbn::cuda::(anonymous namespace)::{kernel}<{args}>(convbn::cuda::ElementwiseLaunch, float*)"


OP = "convbn::cuda::(anonymous namespace)::{}<c10::BFloat16, float>"
FINISH = "convbn::cuda::(anonymous namespace)::FinishMeanVar<float>"


@pytest.mark.parametrize("name, expected", [
    (_name("reduce_nchw_kernel", OP.format("WelfordOp")), ("statistics", 1)),
    (_name("reduce_channels_last_kernel", OP.format("WelfordOp")), ("statistics", 1)),
    (_name("merge_partials_kernel", OP.format("WelfordOp") + ", " + FINISH), ("statistics", 0)),
    (_name("reduce_channels_last_kernel", OP.format("GradSumsOp")), ("backward sums", 2)),
    (_name("merge_partials_kernel", OP.format("GradSumsOp")), ("backward sums", 0)),
    (_name("channel_affine_kernel", "c10::BFloat16, float, false, (convbn::ActivationKind)0"), ("normalize", 2)),
    (_name("channel_affine_kernel", "float, float, true, (convbn::ActivationKind)0"),
     ("backward input gradient", 3)),
    (_name("activation_grad_kernel", "c10::Half, float, (convbn::ActivationKind)2"), ("activation gradient", 3)),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int, float)", None),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", None),
])
def test_bandwidth_section_reads_kernel_names(name, expected):
    assert bench_gpu_networks.classify_kernel(name) == expected


def test_bandwidth_totals_count_bytes_per_launch():
    times = {
        _name("reduce_nchw_kernel", OP.format("WelfordOp")): (30.0, 3),
        _name("merge_partials_kernel", OP.format("WelfordOp") + ", " + FINISH): (3.0, 3),
        _name("channel_affine_kernel", "float, float, true, (convbn::ActivationKind)0"): (60.0, 3),
        _name("made_up_kernel", "float"): (1.0, 1),
        "cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int>": (5.0, 1),
    }
    totals, unknown = bench_gpu_networks.pass_totals(times, tensor_bytes=1000)
    assert totals == {"statistics": (3 * 1000, 33.0), "backward input gradient": (3 * 3 * 1000, 60.0)}
    assert unknown == [_name("made_up_kernel", "float")]
