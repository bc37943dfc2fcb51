"""GPU benchmark of whole networks and of the batch-norm passes alone
(issue 14's parts 2-4; bench_gpu.py measures the layers). Three sections,
run in the order --sections gives (default bandwidth,train,frozen):

  train      ResNet-50 training step (autocast, channels_last, SGD step
             included): peak memory and images/s of the eager model,
             convbn.fuse in both modes and (unless --no-compile)
             torch.compile of the eager and of the fused model; then the
             largest batch each fits within --budget-gb (the caching
             allocator capped with set_per_process_memory_fraction), as
             users feel it.
  frozen     frozen-BN fine-tuning (the model in eval mode, its parameters
             trained; PyTorch PR #108757's setting: ResNet-50, batch 64 at
             224): peak memory and step time of eager, convbn.fuse and
             torch.compile with and without Inductor's
             efficient_conv_bn_eval_fx_passes.
  bandwidth  the batch-norm passes alone (statistics, normalize, the
             backward's sums and its input-gradient pass), from the
             profiler's kernel times within ConvBN2d training steps: bytes
             moved / time, against a device-to-device copy timed in the
             same run.

Every contender is checked before it is timed: its output is as close to
the float64 model's as the eager model's is in the same dtype (5x, plus a
floor); the uncompiled ones also in float32 without TF32, since bfloat16
rounding through 50 batch norms leaves even the eager model far from
float64. Times are medians of CUDA events over interleaved repeats, after
warm-up; ratios are against the eager model of the same run. Peak memory
is torch.cuda.max_memory_allocated over one step, above what was allocated
before it (the parameters, gradients and optimizer state), and in total.
`--device cpu` runs the same code on the CPU with what it can measure there
(a smoke test: no memory figures, no CUDA kernels to time).

    python3 benchmarks/bench_gpu_networks.py --markdown gpu_results.md
"""

import argparse
import copy
import datetime
import gc
import os
import re
import sys

import torch
import torch.nn.functional as F
from torch import nn

import convbn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import geomean, interleaved_medians  # noqa: E402
from bench_gpu import RESNET50_SHAPES, Timer, device_description, emitter  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check_as_accurate_as_eager(outputs, expected, dtype, what):
    """Every contender's output within 5x the eager model's error against the
    float64 model (relative Frobenius norm), plus a floor for the dtype:
    rounding differs between correct implementations, a wrong one is off by
    O(1). Returns the errors (for the table)."""
    floor = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}[dtype]
    errors = {c: relative_error(out, expected) for c, out in outputs.items()}
    bound = 5 * errors["eager"] + floor
    for contender, err in errors.items():
        if not err <= bound:  # (NaN fails too)
            raise AssertionError(f"{what}, {contender}: relative error {err:.3g} against the float64 model, "
                                 f"eager's is {errors['eager']:.3g} (bound {bound:.3g})")
    return errors


class Trainer:
    """One contender: a model, its SGD optimizer and its training step."""

    def __init__(self, model, amp_dtype, device):
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.amp_dtype = amp_dtype
        self.device = device

    def forward(self, x, autocast=True):
        amp = autocast and self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=amp):
            return self.model(x)

    def step(self, x, target):
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.forward(x).float(), target).backward()
        self.optimizer.step()


def peak_bytes(device, fn):
    """(peak above what was allocated before fn, peak in total) over fn()."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak - base, peak


TRAIN_CONTENDERS = ("eager", "convbn memory-efficient", "convbn save-output", "compile eager", "compile convbn")
FROZEN_CONTENDERS = ("eager", "convbn", "compile eager", "compile + efficient_conv_bn_eval")


def make_model(contender, reference, device, memory_format, training):
    """One contender, with its own copy of the reference's state."""
    if contender == "eager" or contender.startswith("compile eager") or "efficient_conv_bn_eval" in contender:
        model = copy.deepcopy(reference)
    else:  # convbn, or compile convbn
        model = convbn.fuse(reference, memory_efficient="save-output" not in contender)
    model = model.to(device, memory_format=memory_format).train(training)
    if "efficient_conv_bn_eval" in contender:
        return torch.compile(model, options={"efficient_conv_bn_eval_fx_passes": True})
    return torch.compile(model) if contender.startswith("compile") else model


def measure_steps(reference, trainers, x, target, repeats, device, dtype, what):
    """Checks each contender's output against the float64 model, then
    measures peak memory and the median step time."""
    # The check: one forward with autograd on (so that a compiled model
    # compiles its training graph once), from the same state. In training
    # mode this also updates every model's running statistics alike.
    training = trainers["eager"].model.training
    ref64 = copy.deepcopy(reference).to(device, torch.float64).train(training)
    with torch.no_grad():
        expected = ref64(x.double())
    del ref64
    # Through 50 batch norms, bfloat16 rounding leaves the eager model's
    # output itself far from float64 (10-30% at small images), which would
    # let much pass: so the eager contenders are also checked in float32
    # (no autocast, no TF32) against the float32 bound. The compiled ones
    # are checked in the timed mode only (a second compile otherwise).
    if x.dtype == torch.float32 and (dtype != torch.float32 or torch.backends.cudnn.allow_tf32):
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                outputs = {c: t.forward(x, autocast=False) for c, t in trainers.items()
                           if not c.startswith("compile")}
            check_as_accurate_as_eager(outputs, expected, torch.float32, what + " (float32 check)")
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
    outputs = {c: t.forward(x).detach() for c, t in trainers.items()}
    errors = check_as_accurate_as_eager(outputs, expected, dtype, what)
    del outputs, expected
    steps = {c: (lambda t=t: t.step(x, target)) for c, t in trainers.items()}
    for fn in steps.values():  # gradients and optimizer state exist before measuring, as in training
        fn(), fn()
    memory = {c: peak_bytes(device, fn) for c, fn in steps.items()}
    times = interleaved_medians(steps, repeats, warmup=2, timer=Timer(device))
    return errors, memory, times


def largest_batch(make_trainer, size, device, budget_bytes, start, granularity):
    """The largest batch (a multiple of granularity) whose training step
    runs within budget_bytes of the caching allocator: doubling from start,
    then bisecting. Only this contender's model lives meanwhile."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    trainer = make_trainer()

    def fits(batch):
        try:
            x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
            target = torch.randint(0, 1000, (batch,), device=device)
            trainer.step(x, target), trainer.step(x, target)
            sync(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            x = target = None
            trainer.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()

    torch.cuda.set_per_process_memory_fraction(min(budget_bytes / total, 1.0), device)
    try:
        lo, hi = 0, start
        while fits(hi):
            lo, hi = hi, hi * 2
        while hi - lo > granularity:
            mid = (lo + hi) // 2 // granularity * granularity
            if mid <= lo:
                break
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        del trainer
        gc.collect()
        torch.cuda.empty_cache()


def mib(b):
    return f"{b / 2**20:,.0f} MiB"


def network_table(errors, memory, times, batch, base="eager"):
    lines = ["| contender | step time | images/s | peak above base | peak in total | output error vs float64 |",
             "|---|---|---|---|---|---|"]
    for c in times:
        t, (above, total) = times[c], memory[c]
        lines.append(
            f"| {c} | {t:.2f} ms ({t / times[base]:.2f}x) | {batch / t * 1e3:,.0f} ({times[base] / t:.2f}x) | "
            f"{mib(above)} ({above / memory[base][0]:.2f}x) | {mib(total)} ({total / memory[base][1]:.2f}x) | "
            f"{errors[c]:.2e} |")
    return lines


def bench_train(args, device, emit):
    amp = None if args.dtype == "float32" else getattr(torch, args.dtype)
    contenders = [c for c in TRAIN_CONTENDERS if not (args.no_compile and c.startswith("compile"))]
    torch.manual_seed(0)
    reference = convbn.models.resnet50()
    trainers = {c: Trainer(make_model(c, reference, device, torch.channels_last, True), amp, device)
                for c in contenders}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    errors, memory, times = measure_steps(reference, trainers, x, target, args.repeats, device,
                                          amp or torch.float32, "ResNet-50 training")
    emit(["", f"### ResNet-50 training step: batch {args.batch} at {args.size} px, "
              f"{args.dtype + ' autocast' if amp else 'float32'}, channels_last, SGD step included", ""]
         + network_table(errors, memory, times, args.batch))
    del trainers, x, target
    gc.collect()

    if device.type != "cuda" or args.budget_gb <= 0:
        return
    searched = [c for c in contenders if args.budget_compile or not c.startswith("compile")]
    results = {}
    for contender in searched:
        def make_trainer(contender=contender):
            return Trainer(make_model(contender, reference, device, torch.channels_last, True), amp, device)
        results[contender] = largest_batch(make_trainer, args.size, device, args.budget_gb * 1e9,
                                           args.batch, args.granularity)
        print(f"largest batch, {contender}: {results[contender]}", flush=True)
    emit(["", f"Largest training batch within {args.budget_gb:g} GB of the caching allocator "
              f"(multiples of {args.granularity}):", ""]
         + [f"- {c}: {b} ({b / results['eager']:.2f}x eager)" for c, b in results.items()])


def bench_frozen(args, device, emit):
    dtype = getattr(torch, args.frozen_dtype)
    contenders = [c for c in FROZEN_CONTENDERS if not (args.no_compile and c.startswith("compile"))]
    fmt = torch.channels_last if args.frozen_channels_last else torch.contiguous_format
    torch.manual_seed(0)
    reference = convbn.models.resnet50().to(dtype)
    for m in reference.modules():  # trained statistics, not the fresh 0 and 1
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    trainers = {c: Trainer(make_model(c, reference, device, fmt, False), None, device) for c in contenders}
    x = torch.randn(args.frozen_batch, 3, args.size, args.size, device=device, dtype=dtype).contiguous(
        memory_format=fmt)
    target = torch.randint(0, 1000, (args.frozen_batch,), device=device)
    from torch._dynamo.utils import counters

    counters["inductor"]["efficient_conv_bn_eval"] = 0
    errors, memory, times = measure_steps(reference.eval(), trainers, x, target, args.repeats, device, dtype,
                                          "frozen-BN fine-tuning")
    rewritten = counters["inductor"]["efficient_conv_bn_eval"]
    emit(["", f"### Frozen-BN fine-tuning (eval mode, parameters trained): ResNet-50, batch {args.frozen_batch} "
              f"at {args.size} px, {args.frozen_dtype}, {'channels_last' if args.frozen_channels_last else 'NCHW'}, "
              "SGD step included", ""]
         + network_table(errors, memory, times, args.frozen_batch)
         + ([] if args.no_compile else
            ["", f"Inductor's efficient_conv_bn_eval pass rewrote {rewritten} conv+BN calls "
                 "(counters['inductor']; ResNet-50 has 53 pairs)."]))


# ---- The batch-norm passes alone --------------------------------------------

# convbn's CUDA kernels (cuda/batch_norm_kernels.cu), by the name the
# profiler gives them, and the tensors of the conv output's size each
# moves: the statistics read y; the backward's sums read dy and y; the
# affine pass reads u and writes out (normalize), or reads u and v too
# (the backward's input gradient: dy, y); the activation's gradient reads
# dy and y and writes dz. A reduction's merge kernel counts toward its
# pass's time and moves no full tensor.
KERNEL_PASSES = [
    (re.compile(r"merge_partials_kernel<[^>]*WelfordOp"), "statistics", 0),
    (re.compile(r"merge_partials_kernel<[^>]*GradSumsOp"), "backward sums", 0),
    (re.compile(r"reduce_\w+_kernel<[^>]*WelfordOp"), "statistics", 1),
    (re.compile(r"reduce_\w+_kernel<[^>]*GradSumsOp"), "backward sums", 2),
    (re.compile(r"channel_affine_kernel<[^,]+, ?[^,]+, ?(false|0)\b"), "normalize", 2),
    (re.compile(r"channel_affine_kernel<[^,]+, ?[^,]+, ?(true|1)\b"), "backward input gradient", 3),
    (re.compile(r"activation_grad_kernel"), "activation gradient", 3),
]


def classify_kernel(name):
    """(pass, tensors moved) of a convbn kernel's profiler name, or None for
    any other kernel (cuDNN's, PyTorch's)."""
    for pattern, what, tensors in KERNEL_PASSES:
        if pattern.search(name):
            return what, tensors
    return None


def pass_totals(kernel_times, tensor_bytes):
    """{pass: (bytes, microseconds)} from {kernel name: (total us, calls)}:
    each launch moves `tensors` tensors of tensor_bytes. Names of convbn
    kernels no pattern knows are returned apart, so a renamed kernel shows."""
    totals, unknown = {}, []
    for name, (micros, calls) in kernel_times.items():
        kind = classify_kernel(name)
        if kind is None:
            if "convbn" in name:
                unknown.append(name)
            continue
        what, tensors = kind
        moved, spent = totals.get(what, (0, 0.0))
        totals[what] = (moved + tensors * tensor_bytes * calls, spent + micros)
    return totals, unknown


def copy_bandwidth(numel, dtype, device, repeats):
    """Bytes read plus written per second by a device-to-device copy."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    (ms,) = interleaved_medians({"copy": lambda: dst.copy_(src)}, repeats, warmup=3, timer=Timer(device)).values()
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def bench_bandwidth(args, device, emit):
    from torch.profiler import ProfilerActivity, profile

    shapes = [s for s in RESNET50_SHAPES if s[0] in args.bandwidth_shapes.split(";")]
    lines = ["", f"### Batch-norm passes alone: bytes moved / time against a device-to-device copy "
                 f"(batch {args.batch}, {args.dtype})", "",
             "| shape | layout | mode | copy | " + " | ".join(
                 p for p in ("statistics", "normalize", "backward sums", "backward input gradient")) + " |",
             "|---|---|---|---|---|---|---|---|"]
    fractions = []
    dtype = getattr(torch, args.dtype)
    for name, cin, cout, k, s, hw in shapes:
        for layout in ("channels_last", "nchw"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            torch.manual_seed(0)
            conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
            bn = nn.BatchNorm2d(cout)
            x = torch.randn(args.batch, cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
            x.requires_grad_()
            for memory_efficient in (True, False):
                layer = convbn.ConvBN2d.from_modules(conv, bn, memory_efficient).to(device, dtype).to(
                    memory_format=fmt)
                out = layer(x)
                grad = torch.randn_like(out)
                y_bytes = out.numel() * out.element_size()
                copy_bw = copy_bandwidth(out.numel(), dtype, device, args.repeats)

                def step():
                    x.grad = None
                    layer(x).backward(grad)
                for _ in range(3):
                    step()
                sync(device)
                # (On the CPU no kernel is a CUDA one: the cells stay "-".)
                activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
                with profile(activities=[activity]) as prof:
                    for _ in range(args.repeats):
                        step()
                    sync(device)
                kernel_times = {e.key: (e.device_time_total, e.count) for e in prof.key_averages()
                                if e.device_type == torch.autograd.DeviceType.CUDA}
                totals, unknown = pass_totals(kernel_times, y_bytes)
                if unknown:
                    print("convbn kernels of no known pass (KERNEL_PASSES):", *unknown, sep="\n  ", flush=True)
                cells = []
                for what in ("statistics", "normalize", "backward sums", "backward input gradient"):
                    if what not in totals:
                        cells.append("-")
                        continue
                    moved, micros = totals[what]
                    bw = moved / (micros * 1e-6)
                    fractions.append(bw / copy_bw)
                    cells.append(f"{bw / 1e12:.2f} TB/s ({bw / copy_bw:.0%})")
                mode = "memory-efficient" if memory_efficient else "save-output"
                lines.append(f"| {name} | {layout} | {mode} | {copy_bw / 1e12:.2f} TB/s | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
                del layer, out, grad
    if fractions:
        lines += ["", f"Geometric mean over the passes: {geomean(fractions):.0%} of the copy bandwidth."]
    emit(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sections", default="bandwidth,train,frozen",
                        help="run in this order (the quickest first, for a run cut short by a time limit)")
    parser.add_argument("--batch", type=int, default=128, help="training batch (and the bandwidth section's)")
    parser.add_argument("--size", type=int, default=224, help="image size")
    parser.add_argument("--dtype", default="bfloat16", help="training: the autocast dtype, or float32 for none")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="leave the torch.compile contenders out")
    parser.add_argument("--budget-gb", type=float, default=40.0, help="0: no largest-batch search")
    parser.add_argument("--budget-compile", action="store_true",
                        help="also search the compiled contenders' largest batch (a compile per batch tried)")
    parser.add_argument("--granularity", type=int, default=32)
    parser.add_argument("--frozen-batch", type=int, default=64)
    parser.add_argument("--frozen-dtype", default="float32")
    parser.add_argument("--frozen-channels-last", action="store_true")
    parser.add_argument("--bandwidth-shapes", default="l1 1x1 64-256;l1 3x3 64-64;l2 1x1 128-512;l3 1x1 256-1024",
                        help="';'-separated names from bench_gpu.RESNET50_SHAPES")
    parser.add_argument("--markdown", help="append the tables here")
    args = parser.parse_args()

    device = torch.device(args.device)
    sections = args.sections.split(",")
    for s in sections:
        if s not in ("train", "frozen", "bandwidth"):
            parser.error(f"--sections: unknown section {s!r} (train, frozen, bandwidth)")
    where = device_description(device)
    emit = emitter(args.markdown)
    emit(["", f"## Whole networks ({where}; torch {torch.__version__}; date {datetime.date.today().isoformat()}; "
              f"medians of {args.repeats} repeats; TF32 for float32 convolutions: "
              f"{torch.backends.cudnn.allow_tf32})"])
    for section in sections:  # in the order given: each table is written when done
        if section == "train":
            bench_train(args, device, emit)
        elif section == "frozen":
            bench_frozen(args, device, emit)
        else:
            bench_bandwidth(args, device, emit)


if __name__ == "__main__":
    main()
