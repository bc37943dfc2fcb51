"""GPU benchmark of convbn against nn.Conv2d + nn.BatchNorm2d (cuDNN).

Every distinct conv+BN shape of ResNet-50 (224x224 input), at batch 128 or
the largest that fits for every contender, per dtype and memory format:
train step (forward + backward, CUDA events, median) and activation memory
(torch.cuda.max_memory_allocated over the step minus what inputs, weights
and the incoming gradient hold) for the eager pair, convbn in both modes,
the tutorial-style Python recompute Function and (with --compile)
torch.compile of the pair; eval time against the bare conv. Ratios are
against the eager pair (train, memory) or the bare conv (eval) of the same
run. Before timing, every contender's output and input gradient (and the
eval output of convbn) are checked against the float64 pair: the worst
channel's error within 5x the eager pair's in the same dtype, plus a floor.
A contender that fails is not timed ("check failed" in the table) and the
script exits non-zero after writing the tables. `--device cpu` runs the same code on the CPU (a
smoke test; use bench_cpu.py for CPU figures).

Each measured row is also printed as a line `ROW {json}`, so that the plot
can be drawn from the log wherever matplotlib is:

    python3 benchmarks/bench_gpu.py --markdown gpu_results.md [--compile] > bench.log
    python3 benchmarks/bench_gpu.py --plot-from bench.log --plot gpu_layers.png
"""

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time

import torch
from torch import nn

import convbn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import TutorialModule, geomean, interleaved_medians  # noqa: E402

# (name, in_channels, out_channels, kernel, stride, input height/width)
RESNET50_SHAPES = [
    ("stem 7x7/2", 3, 64, 7, 2, 224),
    ("l1 1x1 64-64", 64, 64, 1, 1, 56),
    ("l1 3x3 64-64", 64, 64, 3, 1, 56),
    ("l1 1x1 64-256", 64, 256, 1, 1, 56),
    ("l1 1x1 256-64", 256, 64, 1, 1, 56),
    ("l2 1x1 256-128", 256, 128, 1, 1, 56),
    ("l2 3x3/2 128-128", 128, 128, 3, 2, 56),
    ("l2 1x1 128-512", 128, 512, 1, 1, 28),
    ("l2 ds 1x1/2 256-512", 256, 512, 1, 2, 56),
    ("l2 1x1 512-128", 512, 128, 1, 1, 28),
    ("l2 3x3 128-128", 128, 128, 3, 1, 28),
    ("l3 1x1 512-256", 512, 256, 1, 1, 28),
    ("l3 3x3/2 256-256", 256, 256, 3, 2, 28),
    ("l3 1x1 256-1024", 256, 1024, 1, 1, 14),
    ("l3 ds 1x1/2 512-1024", 512, 1024, 1, 2, 28),
    ("l3 1x1 1024-256", 1024, 256, 1, 1, 14),
    ("l3 3x3 256-256", 256, 256, 3, 1, 14),
    ("l4 1x1 1024-512", 1024, 512, 1, 1, 14),
    ("l4 3x3/2 512-512", 512, 512, 3, 2, 14),
    ("l4 1x1 512-2048", 512, 2048, 1, 1, 7),
    ("l4 ds 1x1/2 1024-2048", 1024, 2048, 1, 2, 14),
    ("l4 1x1 2048-512", 2048, 512, 1, 1, 7),
    ("l4 3x3 512-512", 512, 512, 3, 1, 7),
]


class Timer:
    """Milliseconds of fn(): CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def step_peak_bytes(device, step, clear=None):
    """Peak memory of one step above what was allocated before it (after
    clear(), which frees what the step would free first: the gradients)."""
    if device.type != "cuda":
        return float("nan")
    if clear is not None:
        clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def make_contenders(conv, bn, use_compile):
    contenders = {
        "eager pair": nn.Sequential(conv, bn),
        "convbn memory-efficient": convbn.ConvBN2d.from_modules(conv, bn, memory_efficient=True),
        "convbn save-output": convbn.ConvBN2d.from_modules(conv, bn, memory_efficient=False),
        "tutorial Function": TutorialModule(conv),
    }
    if use_compile:
        # Its own copies: a compiled module sharing the pair's BN would move
        # the pair's running statistics too. Static shapes: a model is
        # compiled for its shape (main resets Dynamo between shapes).
        contenders["torch.compile pair"] = torch.compile(
            nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn)), dynamic=False)
    return contenders


def worst_channel_error(actual, expected):
    """The largest relative error (Frobenius norm) of any channel (dim 1):
    an error confined to a few channels is not diluted by the others."""
    diff = (actual.double() - expected).transpose(0, 1).flatten(1).norm(dim=1)
    return (diff / expected.transpose(0, 1).flatten(1).norm(dim=1).clamp_min(1e-30)).max().item()


def check_contenders(contenders, reference, x, grad, what):
    """Each contender's output (and, with grad, input gradient) against the
    float64 copy of `reference` (the eager pair's modules): the worst
    channel's error within 5x the eager pair's (the first contender's) plus
    a floor for the dtype (about one rounding of it). Returns {contender:
    why} for those that fail, which are then not timed. With grad, it runs
    each contender once (a training step: its running statistics move, as
    when timed)."""
    floor = {torch.float32: 1e-4, torch.bfloat16: 4e-3, torch.float16: 1e-3}[x.dtype]

    def results(module, dtype):
        xc = x.detach().to(dtype).requires_grad_(grad is not None)
        out = module(xc)
        if grad is None:
            return {"output": out.detach()}
        out.backward(grad.to(dtype))
        module.zero_grad(set_to_none=True)
        return {"output": out.detach(), "input gradient": xc.grad}

    expected = results(copy.deepcopy(reference).double(), torch.float64)
    errors = {label: {name: worst_channel_error(t, expected[name]) for name, t in results(m, x.dtype).items()}
              for label, m in contenders.items()}
    pair = next(iter(errors.values()))
    failures = {}
    for label, errs in errors.items():
        for name, err in errs.items():
            bound = 5 * pair[name] + floor
            if not err <= bound:  # (NaN fails too)
                failures[label] = (f"{what}, {label}, {name}: worst channel's relative error {err:.3g} against "
                                   f"the float64 pair, the eager pair's is {pair[name]:.3g} (bound {bound:.3g})")
                print("CHECK FAILED: " + failures[label], flush=True)
                break
    return failures


def bench_shape(shape, batch, dtype, memory_format, device, repeats, use_compile, check=True):
    name, cin, cout, k, s, hw = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False, device=device, dtype=dtype)
    bn = nn.BatchNorm2d(cout, device=device, dtype=dtype)
    conv = conv.to(memory_format=memory_format)
    contenders = make_contenders(conv, bn, use_compile)
    x = torch.randn(batch, cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    x.requires_grad_()
    with torch.no_grad():  # (the conv alone: a training-mode pass would move the pair's statistics only)
        grad = torch.randn_like(conv(x)).contiguous(memory_format=memory_format)
    row = {"shape": name, "batch": batch, "failed": {}}
    what = f"{name}, {dtype}, {memory_format}"
    if check:
        row["failed"] = check_contenders(contenders, contenders["eager pair"], x, grad, what)
    timed = {label: m for label, m in contenders.items() if label not in row["failed"]}
    timer = Timer(device)

    def clear_grads(module):
        for p in module.parameters():
            p.grad = None
        x.grad = None

    def train_step(module):
        def step():
            clear_grads(module)
            module(x).backward(grad)
        return step

    steps = {label: train_step(m) for label, m in timed.items()}
    for label, step in steps.items():
        step()  # grads exist before measuring, as in training
        row[f"mem {label}"] = step_peak_bytes(device, step, clear=lambda m=timed[label]: clear_grads(m))
    times = interleaved_medians(steps, repeats, warmup=3, timer=timer)
    for label in contenders:
        row[f"train {label}"] = times.get(label, float("nan"))
        row.setdefault(f"mem {label}", float("nan"))

    bare = nn.Conv2d(cin, cout, k, s, k // 2, bias=True, device=device, dtype=dtype).to(memory_format=memory_format)
    evals = {"bare conv": bare, "eager pair": contenders["eager pair"], "convbn": contenders["convbn memory-efficient"]}
    for m in evals.values():
        m.eval()
    xe = x.detach()
    # The folded eval against the pair's state now: both took the same
    # training steps (unless convbn failed its check and was not timed).
    if check and "convbn memory-efficient" not in row["failed"]:
        failed = check_contenders({c: evals[c] for c in ("eager pair", "convbn")}, evals["eager pair"], xe, None,
                                  what + ", eval")
        row["failed"].update({f"eval {c}": why for c, why in failed.items()})
    with torch.no_grad():
        times = interleaved_medians({label: (lambda m=m: m(xe)) for label, m in evals.items()}, repeats,
                                    warmup=3, timer=timer)
    for label in evals:
        row[f"eval {label}"] = times[label]
    return row


def largest_batch(shape, dtype, memory_format, device, start, use_compile):
    """The largest batch <= start (halving) that every contender can run."""
    batch = start
    while batch >= 1:
        try:
            bench_shape(shape, batch, dtype, memory_format, device, repeats=1, use_compile=use_compile, check=False)
            return batch
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    raise RuntimeError(f"{shape[0]} does not fit even at batch 1")


def table(rows, contenders):
    head = ("| shape | batch | " + " | ".join(f"train {c}" for c in contenders)
            + " | " + " | ".join(f"memory {c}" for c in contenders) + " | eval pair | eval convbn |")
    lines = [head, "|" + "---|" * (2 + 2 * len(contenders) + 2)]
    for r in rows:
        t0, m0, bare = r["train eager pair"], r["mem eager pair"], r["eval bare conv"]
        cells = [r["shape"], str(r["batch"])]
        failed = r.get("failed", {})
        cells += ["check failed" if c in failed else f"{r[f'train {c}']:.3f} ms ({r[f'train {c}'] / t0:.2f}x)"
                  for c in contenders]
        cells += ["check failed" if c in failed else f"{r[f'mem {c}'] / 2**20:.1f} MiB ({r[f'mem {c}'] / m0:.2f}x)"
                  for c in contenders]
        cells += ["check failed" if f"eval {c}" in failed else f"{r[f'eval {label}'] / bare:.2f}x bare"
                  for c, label in (("eager pair", "eager pair"), ("convbn", "convbn"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows, contenders):
    # (over the shapes where both were timed: a contender that failed its check was not)
    def g(key, base):
        ratios = [r[key] / r[base] for r in rows if math.isfinite(r[key] / r[base])]
        return geomean(ratios) if ratios else float("nan")

    out = [f"- train {c}: {g(f'train {c}', 'train eager pair'):.2f}x eager; activation memory "
           f"{g(f'mem {c}', 'mem eager pair'):.2f}x eager" for c in contenders[1:]]
    out.append(f"- eval convbn: {g('eval convbn', 'eval bare conv'):.2f}x bare conv "
               f"(eager pair {g('eval eager pair', 'eval bare conv'):.2f}x)")
    return "\n".join(out)


def device_description(device):
    if device.type != "cuda":
        return "CPU (smoke test)"
    props = torch.cuda.get_device_properties(device)
    return f"{props.name}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"


def emitter(markdown):
    """emit(lines): prints them and appends them to markdown (if given), each
    table as soon as it is done, so that a run cut short by a time limit
    keeps the finished ones."""
    def emit(lines):
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        if markdown:
            with open(markdown, "a") as f:
                f.write(text)
    return emit


def plot(log, png):
    """Per-layer train time and activation memory against the eager pair,
    one column per dtype and layout, from the ROW lines of a run's log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    with open(log) as f:
        for line in f:
            if line.startswith("ROW "):
                row = json.loads(line[4:])
                groups.setdefault((row["dtype"], row["layout"]), []).append(row)
    if not groups:
        raise SystemExit(f"--plot-from: no ROW lines in {log}")
    fig, axes = plt.subplots(2, len(groups), figsize=(7 * len(groups), 8), squeeze=False)
    for col, ((dtype, layout), rows) in enumerate(sorted(groups.items())):
        contenders = [k[len("train "):] for k in rows[0] if k.startswith("train ") and k != "train eager pair"]
        width = 0.8 / len(contenders)
        for row_i, (key, label) in enumerate((("train", "train step time"), ("mem", "activation memory"))):
            ax = axes[row_i][col]
            for i, c in enumerate(contenders):
                ax.bar([j + i * width for j in range(len(rows))],
                       [r[f"{key} {c}"] / r[f"{key} eager pair"] for r in rows], width, label=c)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
            ax.set_xticklabels([r["shape"] for r in rows], rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(f"{label} / eager pair")
            ax.set_title(f"{dtype}, {layout}: {label}", fontsize=10)
            if row_i == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"convbn per layer, ResNet-50 shapes ({rows[0].get('device', '')})")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--layouts", default="channels_last,nchw")
    parser.add_argument("--shapes", type=int, default=len(RESNET50_SHAPES), help="first N shapes only")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the pair (slow to compile)")
    parser.add_argument("--markdown", help="append the tables here")
    parser.add_argument("--plot-from", help="draw --plot from the ROW lines of this log, and measure nothing")
    parser.add_argument("--plot", help="the PNG to write (with --plot-from)")
    args = parser.parse_args()
    if args.plot_from or args.plot:
        if not (args.plot_from and args.plot):
            parser.error("--plot-from and --plot go together")
        plot(args.plot_from, args.plot)
        return

    device = torch.device(args.device)
    shapes = RESNET50_SHAPES[: args.shapes]
    contenders = list(make_contenders(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), args.compile))
    where = device_description(device)
    emit = emitter(args.markdown)
    emit([f"Device: {where}; torch {torch.__version__}; date {datetime.date.today().isoformat()}; "
          f"medians of {args.repeats} repeats; TF32 for float32 convolutions: {torch.backends.cudnn.allow_tf32} "
          "(PyTorch's default, for every contender alike)."])
    failures = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for layout in args.layouts.split(","):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            rows = []
            for shape in shapes:
                torch._dynamo.reset()  # each shape's compiled pair compiled afresh, for its shape alone
                batch = largest_batch(shape, dtype, fmt, device, args.batch, args.compile)
                rows.append(bench_shape(shape, batch, dtype, fmt, device, args.repeats, args.compile))
                print("ROW " + json.dumps({"dtype": dtype_name, "layout": layout, "device": where, **rows[-1]}),
                      flush=True)
                print(f"done: {dtype_name} {layout} {shape[0]} (batch {batch})", flush=True)
            failures += [why for r in rows for why in r["failed"].values()]
            emit(["", f"### {dtype_name}, {layout}", "", table(rows, contenders), "",
                  "Geometric means over the shapes:", summary(rows, contenders)]
                 + [f"- CHECK FAILED (not timed): {why}" for r in rows for why in r["failed"].values()])
    if failures:
        sys.exit(f"bench_gpu: {len(failures)} contenders failed their check (not timed); see the tables")


if __name__ == "__main__":
    main()
