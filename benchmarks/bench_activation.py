"""Conv -> BN -> activation fused into one operator (the `activation`
argument): the bytes kept for backward and the train step time, against the
eager nn chain measured in the same run.

Per layer (--layers): Conv-BN-ReLU and Conv-BN-SiLU at ResNet-50 and
EfficientNet-B0 shapes and one 3-D shape, for

  - nn:          nn.Conv -> nn.BatchNorm -> nn.ReLU(inplace=True) / nn.SiLU()
                 (the reference);
  - conv+bn:     convbn's module without the activation, nn's after it (what
                 convbn.fuse gave before activations were fused);
  - mem-eff:     the module with the activation fused, memory_efficient=True;
  - save-output: the same, memory_efficient=False.

Whole networks (--networks): ResNet-50 (convbn.models.resnet50: its blocks
share one ReLU module, which fuse leaves unfused) and an EfficientNet-B0-like
network (MBConv blocks of Conv-BN-SiLU, squeeze-excitation, residual adds),
in training and in frozen-BN mode (eval, weights training), for nn and
convbn.fuse(model) in both memory modes.

"Kept" is what autograd keeps for backward beyond the input and the model's
own tensors (convbn.utils.saved_tensor_bytes). Times are medians of
interleaved repeats (forward + backward). Writes Markdown tables to stdout
and --markdown.

    python3 benchmarks/bench_activation.py --markdown out.md
"""

import argparse
import copy
import datetime
import platform

import torch
from torch import nn

import convbn
from bench_cpu import geomean, interleaved_medians

# (name, conv type, conv arguments, input shape)
LAYERS = [
    ("ResNet-50 3x3 64->64 @56", nn.Conv2d, dict(in_channels=64, out_channels=64, kernel_size=3, padding=1),
     (8, 64, 56, 56)),
    ("ResNet-50 1x1 256->64 @56", nn.Conv2d, dict(in_channels=256, out_channels=64, kernel_size=1),
     (8, 256, 56, 56)),
    ("EffNet-B0 1x1 24->144 @56", nn.Conv2d, dict(in_channels=24, out_channels=144, kernel_size=1),
     (8, 24, 56, 56)),
    ("EffNet-B0 dw 3x3 144 @56", nn.Conv2d,
     dict(in_channels=144, out_channels=144, kernel_size=3, padding=1, groups=144), (8, 144, 56, 56)),
    ("3-D 3x3x3 32->32 @16x32x32", nn.Conv3d, dict(in_channels=32, out_channels=32, kernel_size=3, padding=1),
     (2, 32, 16, 32, 32)),
]
BATCH_NORM = {nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
ACTIVATIONS = {"ReLU": lambda: nn.ReLU(inplace=True), "SiLU": nn.SiLU}


def kept_bytes(model, x):
    return convbn.utils.saved_tensor_bytes(
        lambda: model(x), exclude=[x, *model.parameters(), *model.buffers()])


def step(model, x):
    def run():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return run


def check_same(models, x, name, input_grad=True):
    """Every contender computes what nn computes (float32 rounding), in the
    models' mode and in training (on copies: no running-statistics update
    of the timed models): the output and, with input_grad, the input's
    gradient. (Through a whole network's 50 training-mode batch norms the
    float32 input gradient is ill-conditioned: nn against itself in another
    summation order differs by O(1) at some elements, so the networks
    compare outputs; tests/ compare them in float64.)"""
    with torch.no_grad():
        expected = models["nn"](x)
        for contender, model in models.items():
            torch.testing.assert_close(
                model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(),
                msg=lambda m: f"{name}, {contender}: {m}")
    results = {}
    for contender, model in models.items():
        xc = x.clone().requires_grad_()
        out = copy.deepcopy(model).train()(xc)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))  # not constant: BN would cancel it
        results[contender] = (out.detach(), xc.grad)
    for contender, (out, grad) in results.items():
        checks = [("train output", out, results["nn"][0])]
        if input_grad:
            checks.append(("input grad", grad, results["nn"][1]))
        for what, ours, theirs in checks:
            torch.testing.assert_close(
                ours, theirs, rtol=1e-3, atol=1e-3 * theirs.abs().max().item(),
                msg=lambda m: f"{name}, {contender}, {what}: {m}")


def measure(models, x, repeats, name):
    """(name, bytes kept, median step times) of the models on x, printed."""
    kept = {c: kept_bytes(m, x) for c, m in models.items()}
    times = interleaved_medians({c: step(m, x) for c, m in models.items()}, repeats)
    print(f"{name}: " + ", ".join(
        f"{c} {kept[c] / kept['nn']:.2f}x bytes {times[c] / times['nn']:.2f}x time" for c in models), flush=True)
    return name, kept, times


def bench_layers(repeats):
    rows = []
    for layer_name, conv_type, conv_args, shape in LAYERS:
        for act_name, make_act in ACTIVATIONS.items():
            torch.manual_seed(0)
            conv = conv_type(**conv_args, bias=False)
            bn = BATCH_NORM[conv_type](conv_args["out_channels"])
            act = make_act()
            fused_type = convbn.modules.CONV_BN_TYPES[(conv_type, type(bn))]
            models = {
                "nn": nn.Sequential(conv, bn, act),
                "conv+bn": nn.Sequential(fused_type.from_modules(conv, bn), make_act()),
                "mem-eff": fused_type.from_modules(conv, bn, activation=act),
                "save-output": fused_type.from_modules(conv, bn, memory_efficient=False, activation=act),
            }
            x = torch.randn(shape)
            name = f"{layer_name}, {act_name}"
            for model in models.values():
                model.eval()
            check_same(models, x, name)  # eval: no running-statistics update
            for model in models.values():
                model.train()
            rows.append(measure(models, x, repeats, name))
    return rows


def mbconv_se(channels, squeezed):
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, squeezed, 1), nn.SiLU(), nn.Conv2d(squeezed, channels, 1),
        nn.Sigmoid())


class MBConv(nn.Module):
    """EfficientNet's inverted residual: 1x1 expand Conv-BN-SiLU, depthwise
    Conv-BN-SiLU, squeeze-excitation, 1x1 project Conv-BN, residual add."""

    def __init__(self, cin, cout, expand, kernel, stride):
        super().__init__()
        mid = cin * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU()]
        layers += [nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False), nn.BatchNorm2d(mid),
                   nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.se = mbconv_se(mid, max(1, cin // 4))
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = self.body(x)
        h = self.project(h * self.se(h))
        return x + h if self.residual else h


def efficientnet_b0_like(num_classes=1000):
    # (expand, channels, repeats, stride, kernel) of EfficientNet-B0.
    stages = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
              (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]
    layers = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU()]
    cin = 32
    for expand, cout, repeats, stride, kernel in stages:
        for i in range(repeats):
            layers.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
            cin = cout
    layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(1280, num_classes)]
    return nn.Sequential(*layers)


def bench_networks(repeats, batch, size):
    rows = []
    for net_name, make in (("ResNet-50", convbn.models.resnet50), ("EfficientNet-B0-like", efficientnet_b0_like)):
        torch.manual_seed(0)
        reference = make()
        x = torch.randn(batch, 3, size, size)
        fused, report = convbn.fuse(copy.deepcopy(reference), report=True, example_inputs=(x,))
        models = {
            "nn": reference,
            "fuse mem-eff": fused,
            "fuse save-output": convbn.fuse(copy.deepcopy(reference), memory_efficient=False),
        }
        activations = sum(1 for m in fused.modules()
                          if isinstance(m, convbn.modules._ConvBNNd) and m.activation != "identity")
        pairs = sum(1 for m in fused.modules() if isinstance(m, convbn.modules._FusedBatchNorm))
        for mode in ("train", "frozen BN"):
            for model in models.values():
                model.train(mode == "train")
            if mode == "frozen BN":  # (and training, on copies)
                check_same(models, x, net_name, input_grad=False)
            name = f"{net_name}, {mode} ({pairs} fused pairs, {activations} with their activation)"
            rows.append(measure(models, x, repeats, name))
    return rows


def table(rows, title):
    contenders = list(rows[0][1])
    lines = [title, "", "| case | " + " | ".join(f"{c} kept (MiB, vs nn)" for c in contenders)
             + " | " + " | ".join(f"{c} step (s, vs nn)" for c in contenders) + " |",
             "|---" * (1 + 2 * len(contenders)) + "|"]
    for name, kept, times in rows:
        cells = [f"{kept[c] / 2**20:.1f} ({kept[c] / kept['nn']:.2f}x)" for c in contenders]
        cells += [f"{times[c]:.3f} ({times[c] / times['nn']:.2f}x)" for c in contenders]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    means = [f"{geomean([k[c] / k['nn'] for _, k, _ in rows]):.2f}x" for c in contenders]
    means += [f"{geomean([t[c] / t['nn'] for _, _, t in rows]):.2f}x" for c in contenders]
    lines.append("| geometric mean | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="whole networks' batch")
    parser.add_argument("--size", type=int, default=160, help="whole networks' image size")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-networks", action="store_true")
    parser.add_argument("--markdown", help="write the tables here")
    args = parser.parse_args()
    header = (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, {datetime.date.today()}")
    tables = []
    if not args.skip_layers:
        tables.append(table(bench_layers(args.repeats), f"Per layer, train step ({header})"))
    if not args.skip_networks:
        tables.append(table(bench_networks(args.repeats, args.batch, args.size),
                            f"Whole networks, batch {args.batch} at {args.size}x{args.size} ({header})"))
    text = "\n\n".join(tables)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
