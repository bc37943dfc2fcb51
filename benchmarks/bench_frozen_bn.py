"""Frozen batch norm: a whole network fine-tuned in eval mode (batch norm at
its running statistics, the weights training), as detection and
segmentation backbones are. For ResNet-50 it measures the bytes kept for
backward (beyond the input and the model's own tensors) and the train step
time (forward + backward) of:

  - nn:       the nn.Conv2d + nn.BatchNorm2d model (the reference);
  - convbn:   convbn.fuse(model), whose eval node keeps only the input and
              the layer's tensors and folds again in backward;
  - fold in the graph: the fold differentiated by autograd, then F.conv2d
              (what convbn's eval operator did before: the conv's node keeps
              the folded weight).

Ratios are against nn measured in the same run; times are medians of
interleaved repeats. Writes a Markdown table (stdout and --markdown).

    python3 benchmarks/bench_frozen_bn.py --batch 8 --size 224 --markdown out.md
"""

import argparse
import copy
import datetime
import platform

import torch
import torch.nn.functional as F
from torch import nn

import convbn
from bench_cpu import interleaved_medians


class FoldInGraph(nn.Module):
    """A ConvBN2d's eval computation with autograd through the fold."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        weight, bias = torch.ops.convbn.fold_conv_bn(
            m.weight, m.bias, m.bn_weight, m.bn_bias, m.running_mean, m.running_var, m.eps)
        return F.conv2d(m._checked_input(x), weight, bias, m._stride, m._conv_padding, m._dilation, m.groups)


def fold_in_graph(fused):
    model = copy.deepcopy(fused)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, convbn.ConvBN2d):
                setattr(module, child_name, FoldInGraph(child))
    return model


def kept_bytes(model, x):
    return convbn.utils.saved_tensor_bytes(lambda: model(x), exclude=[x, *model.parameters(), *model.buffers()])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args()

    torch.manual_seed(0)
    reference = convbn.models.resnet50().eval()
    fused = convbn.fuse(copy.deepcopy(reference)).eval()
    models = {"nn": reference, "convbn": fused, "fold in the graph": fold_in_graph(fused).eval()}
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        expected = reference(x)
        for name, model in models.items():
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        return run

    kept = {name: kept_bytes(model, x) for name, model in models.items()}
    times = interleaved_medians({name: step(model) for name, model in models.items()}, args.repeats)
    lines = [
        f"ResNet-50, batch {args.batch}, {args.size}x{args.size}, eval mode with weights training; "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {datetime.date.today()}",
        "",
        "| model | kept for backward (MiB) | vs nn | train step (s) | vs nn |",
        "|---|---|---|---|---|",
    ]
    for name in models:
        lines.append(
            f"| {name} | {kept[name] / 2**20:.1f} | {kept[name] / kept['nn']:.2f}x | "
            f"{times[name]:.3f} | {times[name] / times['nn']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
