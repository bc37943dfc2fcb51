"""torch.export of an eval-mode model holding ConvBN2d (batch size dynamic):
the exported program, its saved-and-loaded copy and its ATen-decomposed form
run and match eager; AOTInductor packages it, and the package runs from
Python and from the C++ program examples/cpp/aoti_infer.cpp; so does a whole
ResNet-18 converted by convbn.fuse. Where AOTInductor does not work with this
torch, the small network's tests skip and say why; the ResNet-18 one fails."""

import copy

import pytest
import torch

import convbn
from conftest import assert_as_accurate_as_pair, assert_close_to_reference, randomize_batch_norms
from cpp_programs import run_cpp_program
from deploy_helpers import (
    EXACT_TO, assert_matches_eval_net, assert_within, batch, convbn_net_with_statistics, pair_twin,
)


def _export(net, dtype):
    example, _ = batch(2, dtype=dtype)
    n = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(net, (example,), dynamic_shapes={"input": {0: n}})


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory):
    """A float32 eval model, exported and compiled by AOTInductor: (net, package path)."""
    net = convbn_net_with_statistics(torch.float32).eval()
    path = tmp_path_factory.mktemp("aoti") / "net.pt2"
    try:
        torch._inductor.aoti_compile_and_package(_export(net, torch.float32), package_path=str(path))
    except Exception as error:  # no C++ compiler, or this torch cannot do it
        pytest.skip(f"AOTInductor cannot compile here (torch {torch.__version__}): {type(error).__name__}: {error}")
    return net, path


def test_exported_eval_model_matches_eager(tmp_path):
    net = convbn_net_with_statistics().eval()
    exported = _export(net, torch.float64)
    path = tmp_path / "net.pt2"
    torch.export.save(exported, str(path))
    programs = {
        "exported": exported.module(),
        "saved and loaded": torch.export.load(str(path)).module(),
        # What AOTInductor and other backends lower: ATen ops only.
        "decomposed": exported.run_decompositions().module(),
    }
    twin = pair_twin(net)
    for n in (2, 5, 9):  # the batch size is dynamic
        x, _ = batch(n, seed=200 + n)
        with torch.no_grad():
            y_eager, y_pair = net(x), twin(x)
            for name, program in programs.items():
                y = program(x)
                assert_within(y, y_eager, EXACT_TO, f"{name} (batch {n})")
                assert_close_to_reference(y, y_pair, torch.float64, f"{name} against the pair (batch {n})")


def test_aoti_package_runs_from_python(aoti_package):
    net, path = aoti_package
    compiled = torch._inductor.aoti_load_package(str(path))
    for n in (1, 3, 8):
        x, _ = batch(n, dtype=torch.float32, seed=300 + n)
        with torch.no_grad():
            assert_within(compiled(x), net(x), 1e-6, f"AOTInductor output (batch {n})")


def test_aoti_package_runs_from_cpp_like_python(aoti_package, tmp_path):
    net, path = aoti_package
    x, y = run_cpp_program("convbn_aoti_infer", path, (6, 3, 12, 12), tmp_path / "out.pt", "--seed", "11")
    assert_matches_eval_net(y, x, net)


def test_fused_resnet18_aoti_package_runs_from_cpp(tmp_path):
    """The deployment route from training to C++: convbn.fuse(ResNet-18),
    eval, torch.export with a dynamic batch, AOTInductor, the C++ program.
    Its outputs at batch sizes other than the exported one match the fused
    model in eager, and the float64 original nn model as closely as that
    model run in float32 does."""
    torch.manual_seed(0)
    original = randomize_batch_norms(convbn.models.resnet18(num_classes=10), mean_std=0.1).eval()
    fused, report = convbn.fuse(copy.deepcopy(original), report=True)
    assert len(report.fused) == 20, report  # every conv of ResNet-18 has its batch norm
    fused.eval()
    example = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(fused, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    path = tmp_path / "resnet18.pt2"
    torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
    reference = copy.deepcopy(original).double()
    for n, seed in ((3, 1), (5, 2)):
        x, y = run_cpp_program("convbn_aoti_infer", path, (n, 3, 32, 32), tmp_path / f"out{n}.pt", "--seed", str(seed))
        with torch.no_grad():
            assert_within(y, fused(x), 1e-5, f"C++ AOTInductor ResNet-18 against eager (batch {n})")
            assert_as_accurate_as_pair(y, original(x), reference(x.double()), torch.float32,
                                       f"C++ AOTInductor ResNet-18 against the float64 nn model (batch {n})")
