"""CPU benchmark of convbn against nn.Conv2d + nn.BatchNorm2d.

For conv+BN shapes of LeNet and ResNet-18/50 it measures, per contender:
train step (forward + backward) time, eval forward time, and the bytes
saved for backward (saved_tensors_hooks). Times are medians of repeats;
ratios are against the eager pair measured in the same run. Writes a
Markdown table (stdout and --markdown) and a PNG plot (--plot).

    python3 benchmarks/bench_cpu.py --markdown benchmarks/cpu_results.md --plot benchmarks/cpu_train_time.png
"""

import argparse
import datetime
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import convbn

# (name, in_channels, out_channels, kernel, stride, padding, batch, height/width)
SHAPES = [
    ("LeNet conv2 (6->16, 5x5)", 6, 16, 5, 1, 0, 256, 14),
    ("ResNet-18 stem (3->64, 7x7/2)", 3, 64, 7, 2, 3, 8, 224),
    ("ResNet-18 layer1 (64->64, 3x3)", 64, 64, 3, 1, 1, 16, 56),
    ("ResNet-18 layer3 (256->256, 3x3)", 256, 256, 3, 1, 1, 16, 14),
    ("ResNet-50 bottleneck (256->64, 1x1)", 256, 64, 1, 1, 0, 16, 56),
    ("ResNet-50 layer4 (512->2048, 1x1)", 512, 2048, 1, 1, 0, 16, 7),
]


class TutorialConvBN(torch.autograd.Function):
    """The recompute-in-backward Function of PyTorch's tutorial "Fusing
    Convolution and Batch Norm using Custom Function" (no bias, no affine,
    stride 1 in the tutorial; stride and padding added here)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, eps=1e-5):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        y = F.conv2d(x, weight, stride=stride, padding=padding)
        mean = y.mean(dim=(0, 2, 3), keepdim=True)
        var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        invstd = (var + eps).rsqrt()
        ctx.eps = eps
        return (y - mean) * invstd

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        y = F.conv2d(x, weight, stride=ctx.stride, padding=ctx.padding)
        mean = y.mean(dim=(0, 2, 3), keepdim=True)
        invstd = (y.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + ctx.eps).rsqrt()
        xhat = (y - mean) * invstd
        grad_y = invstd * (grad_out - grad_out.mean(dim=(0, 2, 3), keepdim=True)
                           - xhat * (grad_out * xhat).mean(dim=(0, 2, 3), keepdim=True))
        grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_y, ctx.stride, ctx.padding)
        grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad_y, ctx.stride, ctx.padding)
        return grad_x, grad_w, None, None, None


class TutorialModule(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return TutorialConvBN.apply(x, self.conv.weight, self.conv.stride, self.conv.padding)


def wall_seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(fns, repeats, warmup=2, timer=wall_seconds):
    """Median time of each function (as timer(fn) measures it), running them
    round-robin within each repeat so that drift of a shared machine affects
    all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def saved_bytes(module, x):
    """Bytes kept for backward, without the input (every contender keeps it)
    but with the weights (the pair keeps them too)."""
    return convbn.utils.saved_tensor_bytes(lambda: module(x), exclude=[x])


def bench_shape(shape, repeats, use_compile):
    name, cin, cout, k, s, p, n, hw = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, bias=False)
    bn = nn.BatchNorm2d(cout)
    pair = nn.Sequential(conv, bn)
    contenders = {
        "eager pair": pair,
        "convbn memory-efficient": convbn.ConvBN2d.from_modules(conv, bn, memory_efficient=True),
        "convbn save-output": convbn.ConvBN2d.from_modules(conv, bn, memory_efficient=False),
        "tutorial Function": TutorialModule(conv),
    }
    if use_compile:
        contenders["torch.compile pair"] = torch.compile(nn.Sequential(conv, bn))
    x = torch.randn(n, cin, hw, hw)
    grad = torch.randn_like(pair(x))

    row = {"shape": name, "batch": n}
    xr = x.clone().requires_grad_()

    def train_step(module):
        def step():
            module(xr).backward(grad)
        return step

    for module in contenders.values():
        module.train()
    times = interleaved_medians({label: train_step(m) for label, m in contenders.items()}, repeats)
    for label, module in contenders.items():
        row[f"train {label}"] = times[label]
        row[f"saved {label}"] = None if label.startswith("torch.compile") else saved_bytes(module, xr)

    bare = nn.Conv2d(cin, cout, k, s, p, bias=True)
    evals = {"bare conv": bare, "eager pair": pair, "convbn": contenders["convbn memory-efficient"]}
    for module in evals.values():
        module.eval()
    with torch.no_grad():
        times = interleaved_medians({label: (lambda m=m: m(x)) for label, m in evals.items()}, repeats)
    for label in evals:
        row[f"eval {label}"] = times[label]
    row["conv output bytes"] = grad.numel() * grad.element_size()
    return row


def to_markdown(rows, contenders):
    lines = ["| shape | batch | " + " | ".join(f"train {c}" for c in contenders)
             + " | mem-eff extra / conv fwd | eval pair | eval convbn | bytes saved: pair | convbn mem-eff | convbn save-output | tutorial |",
             "|" + "---|" * (2 + len(contenders) + 7)]
    for r in rows:
        base = r["train eager pair"]
        cells = [r["shape"], str(r["batch"])]
        for c in contenders:
            t = r.get(f"train {c}")
            cells.append("n/a" if t is None else f"{t * 1e3:.2f} ms ({t / base:.2f}x)")
        bare = r["eval bare conv"]
        # What the recompute costs, in units of one conv forward (the bare
        # conv's eval time): the target is at most 1.
        cells.append(f"{(r['train convbn memory-efficient'] - base) / bare:.2f}")
        cells.append(f"{r['eval eager pair'] * 1e3:.2f} ms ({r['eval eager pair'] / bare:.2f}x bare)")
        cells.append(f"{r['eval convbn'] * 1e3:.2f} ms ({r['eval convbn'] / bare:.2f}x bare)")
        pair_saved = r["saved eager pair"]
        for c in ("eager pair", "convbn memory-efficient", "convbn save-output", "tutorial Function"):
            cells.append(f"{r[f'saved {c}'] / 2**20:.2f} MiB ({r[f'saved {c}'] / pair_saved:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def geomean(values):
    values = list(values)
    product = 1.0
    for v in values:
        product *= v
    return product ** (1 / len(values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--plot", help="write a PNG plot of train-step time ratios here")
    args = parser.parse_args()

    contenders = ["eager pair", "convbn memory-efficient", "convbn save-output", "tutorial Function"]
    if not args.no_compile:
        contenders.append("torch.compile pair")
    rows = []
    for shape in SHAPES:
        rows.append(bench_shape(shape, args.repeats, not args.no_compile))
        print(f"done: {shape[0]}", flush=True)

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    header = (f"Device: CPU, {cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
              f"date {datetime.date.today().isoformat()}; medians of {args.repeats} repeats; "
              "ratios against the eager pair (train, memory) or the bare conv (eval) of the same run.")
    summary = ["", "Geometric means over the shapes:"]
    for c in contenders[1:]:
        summary.append(f"- train {c}: {geomean(r[f'train {c}'] / r['train eager pair'] for r in rows):.2f}x eager")
    summary.append(f"- eval convbn: {geomean(r['eval convbn'] / r['eval bare conv'] for r in rows):.2f}x bare conv; "
                   f"eval eager pair: {geomean(r['eval eager pair'] / r['eval bare conv'] for r in rows):.2f}x bare conv")
    summary.append(f"- bytes saved, convbn memory-efficient: "
                   f"{geomean(r['saved convbn memory-efficient'] / r['saved eager pair'] for r in rows):.2f}x eager")
    text = header + "\n\n" + to_markdown(rows, contenders) + "\n" + "\n".join(summary) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(11, 5))
        width = 0.8 / len(contenders)
        for i, c in enumerate(contenders):
            ax.bar([j + i * width for j in range(len(rows))],
                   [r[f"train {c}"] / r["train eager pair"] for r in rows], width, label=c)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
        ax.set_xticklabels([r["shape"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("train step time / eager pair")
        ax.set_title(f"convbn CPU train step (torch {torch.__version__}, {torch.get_num_threads()} threads)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
