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
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import convbn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import geomean, interleaved_medians  # noqa: E402
from bench_gpu import RESNET50_SHAPES, Timer, device_description, emitter, step_peak_bytes  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


FLOOR = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# A ReLU network's weight gradient jumps where an activation's input lies
# within rounding of 0: the float32 eager model's stem gradient was 8e-4
# off float64 at one of four inputs (CPU, batch 2 at 64 px) and 1e-6 at
# the others, and so was convbn's at another. A broken backward is off by
# O(1).
GRADIENT_FLOOR = 1e-2


def check_as_accurate_as_eager(results, expected, dtype, what):
    """Every contender's tensors (results: {contender: {name: tensor}})
    within 5x the eager model's error against the float64 model's
    (`expected`: {name: tensor}; relative Frobenius norm), plus a floor for
    the dtype (GRADIENT_FLOOR for gradients): rounding differs between
    correct implementations, a wrong one is off by O(1). Returns the output
    errors (for the table)."""
    errors = {c: {name: relative_error(t, expected[name]) for name, t in r.items()} for c, r in results.items()}
    for contender, errs in errors.items():
        for name, err in errs.items():
            bound = 5 * errors["eager"][name] + (FLOOR[dtype] if name == "output" else GRADIENT_FLOOR)
            if not err <= bound:  # (NaN fails too)
                raise AssertionError(f"{what}, {contender}, {name}: relative error {err:.3g} against the float64 "
                                     f"model, eager's is {errors['eager'][name]:.3g} (bound {bound:.3g})")
    return {c: errs["output"] for c, errs in errors.items()}


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

    def state_bytes(self):
        """The contender's own tensors between steps: parameters, buffers and
        optimizer state (not the gradients: the step makes them)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        unique = {t.data_ptr(): t for t in tensors if t.device.type == self.device.type}
        return sum(t.numel() * t.element_size() for t in unique.values())


def peak_bytes(trainer, x, target):
    """(peak above what was allocated before the step, the peak a process
    holding only this contender would reach: its own state, the batch and
    the peak above). The gradients are freed before reading the base, so
    that the step's peak counts them."""
    above = step_peak_bytes(trainer.device, lambda: trainer.step(x, target),
                            clear=lambda: trainer.optimizer.zero_grad(set_to_none=True))
    batch = x.numel() * x.element_size() + target.numel() * target.element_size()
    return above, trainer.state_bytes() + batch + above


TRAIN_CONTENDERS = ("eager", "convbn memory-efficient", "convbn save-output", "compile eager", "compile convbn")
FROZEN_CONTENDERS = ("eager", "convbn", "compile eager", "compile + efficient_conv_bn_eval")
# The weights whose gradients the float32 check compares: the stem, the
# last convolution, the classifier (the same names in fused models).
CHECKED_GRADS = ("conv1.weight", "layer4.2.conv3.weight", "fc.weight")


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


def float32_results(model, x, grads):
    """The output and, with grads, those weights' gradients of a fixed
    weighting of the output, in float32 without TF32 and autocast."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        params = dict(model.named_parameters())
        for name in grads:
            params[name].grad = None
        with torch.set_grad_enabled(bool(grads)):
            out = model(x.to(next(model.parameters()).dtype))
            if grads:
                out.backward(torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view_as(out))
        results = {"output": out.detach()}
        results.update({name: params[name].grad for name in grads})
        for name in grads:
            params[name].grad = None
        return results
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def measure_steps(reference, trainers, x, target, repeats, check_batch, dtype, what):
    """Checks the contenders against the float64 model, then measures peak
    memory and the median step time of each.

    The check, from the same state (in training mode every model's running
    statistics move alike): first the uncompiled contenders in float32
    without TF32, on the batch's first check_batch images: the output and
    the gradients of CHECKED_GRADS. Through 50 batch norms, bfloat16
    rounding leaves even the eager model's output far from float64 (10-30%
    at small images), which would let much pass. Then every contender's
    output in the timed mode, on the whole batch (so that a compiled model
    compiles its training graph once: a float32 check of it would compile
    again); the compiled ones are so checked against a looser bound."""
    device = x.device
    training = trainers["eager"].model.training
    ref64 = copy.deepcopy(reference).to(device, torch.float64).train(training)
    with torch.no_grad():
        expected_timed = {"output": ref64(x.double())}
    small = x[:check_batch]
    expected = float32_results(ref64, small, CHECKED_GRADS)
    results = {c: float32_results(t.model, small, CHECKED_GRADS) for c, t in trainers.items()
               if not c.startswith("compile")}
    check_as_accurate_as_eager(results, expected, torch.float32, what + " (float32 check)")
    del results, expected, ref64
    outputs = {c: {"output": t.forward(x).detach()} for c, t in trainers.items()}
    errors = check_as_accurate_as_eager(outputs, expected_timed, dtype, what)
    del outputs, expected_timed
    steps = {c: (lambda t=t: t.step(x, target)) for c, t in trainers.items()}
    for fn in steps.values():  # optimizer state exists before measuring, as in training
        fn(), fn()
    memory = {c: peak_bytes(t, x, target) for c, t in trainers.items()}
    times = interleaved_medians(steps, repeats, warmup=2, timer=Timer(device))
    return errors, memory, times


def is_out_of_memory(error):
    """An allocation that failed, as the caching allocator or a library
    (cuDNN finding no engine within the memory left) reports it."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("out of memory", "unable to find an engine", "ALLOC_FAILED"))


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
        except Exception as error:  # noqa: BLE001 (only what is_out_of_memory says; the rest is raised)
            if not is_out_of_memory(error):
                raise
            print(f"  batch {batch}: does not fit ({type(error).__name__}: {str(error).splitlines()[0][:120]})",
                  flush=True)
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
    lines = ["| contender | step time | images/s | peak above base | peak, own state included | "
             "output error vs float64 (timed dtype) |",
             "|---|---|---|---|---|---|"]
    for c in times:
        t, (above, total) = times[c], memory[c]
        lines.append(
            f"| {c} | {t:.2f} ms ({t / times[base]:.2f}x) | {batch / t * 1e3:,.0f} ({times[base] / t:.2f}x) | "
            f"{mib(above)} ({above / memory[base][0]:.2f}x) | {mib(total)} ({total / memory[base][1]:.2f}x) | "
            f"{errors[c]:.2e} |")
    return lines


def measure_group(group, make_trainer, x, target, reference, args, dtype, what, title, emit):
    """The contenders of group (eager first), each built afresh from the
    reference, checked, measured, and their table written."""
    trainers = {c: make_trainer(c) for c in group}
    t0 = time.perf_counter()
    errors, memory, times = measure_steps(reference, trainers, x, target, args.repeats, args.check_batch, dtype,
                                          what)
    compiled = any(c.startswith("compile") for c in group)
    checked = ("the compiled contenders in the timed dtype only (output; a float32 check would compile again), "
               "against 5x eager's error; eager also in float32 (output, weight gradients)" if compiled else
               "in float32 (output, weight gradients) and in the timed dtype (output)")
    emit(["", title + (" (torch.compile)" if compiled else ""), ""]
         + network_table(errors, memory, times, x.shape[0])
         + ["", f"Checked against the float64 model before timing: {checked}. "
                f"Measured in {time.perf_counter() - t0:.0f} s."])
    del trainers
    gc.collect()
    if x.device.type == "cuda":
        torch.cuda.empty_cache()


def split_compiled(contenders):
    """(the uncompiled contenders, eager and the compiled ones or [])."""
    compiled = [c for c in contenders if c.startswith("compile")]
    return [c for c in contenders if c not in compiled], (["eager"] + compiled if compiled else [])


def bench_train(args, device, emit):
    amp = None if args.dtype == "float32" else getattr(torch, args.dtype)
    contenders = [c for c in TRAIN_CONTENDERS if not (args.no_compile and c.startswith("compile"))]
    torch.manual_seed(0)
    reference = convbn.models.resnet50()

    def make_trainer(contender):
        return Trainer(make_model(contender, reference, device, torch.channels_last, True), amp, device)

    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    title = (f"### ResNet-50 training step: batch {args.batch} at {args.size} px, "
             f"{args.dtype + ' autocast' if amp else 'float32'}, channels_last, SGD step included")
    eager_group, compiled_group = split_compiled(contenders)
    measure_group(eager_group, make_trainer, x, target, reference, args, amp or torch.float32,
                  "ResNet-50 training", title, emit)

    # The largest batch before the compiled group, whose compiles take the
    # longest: a run cut short by its time limit keeps this.
    if device.type == "cuda" and args.budget_gb > 0:
        searched = [c for c in contenders if args.budget_compile or not c.startswith("compile")]
        results = {}
        for contender in searched:
            results[contender] = largest_batch(lambda c=contender: make_trainer(c), args.size, device,
                                               args.budget_gb * 1e9, args.batch, args.granularity)
            print(f"largest batch, {contender}: {results[contender]}", flush=True)
        left_out = [c for c in contenders if c not in searched]
        emit(["", f"Largest training batch within {args.budget_gb:g} GB of the caching allocator "
                  f"(multiples of {args.granularity})"
                  + (f"; not searched: {', '.join(left_out)} (a compile per batch tried; --budget-compile)"
                     if left_out else "") + ":", ""]
             + [f"- {c}: {b} ({b / results['eager']:.2f}x eager)" for c, b in results.items()])

    if compiled_group:
        measure_group(compiled_group, make_trainer, x, target, reference, args, amp or torch.float32,
                      "ResNet-50 training", title, emit)


def bench_frozen(args, device, emit):
    from torch._dynamo.utils import counters

    dtype = getattr(torch, args.frozen_dtype)
    contenders = [c for c in FROZEN_CONTENDERS if not (args.no_compile and c.startswith("compile"))]
    fmt = torch.channels_last if args.frozen_channels_last else torch.contiguous_format
    torch.manual_seed(0)
    reference = convbn.models.resnet50().to(dtype).eval()
    for m in reference.modules():  # trained statistics, not the fresh 0 and 1
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)

    def make_trainer(contender):
        return Trainer(make_model(contender, reference, device, fmt, False), None, device)

    x = torch.randn(args.frozen_batch, 3, args.size, args.size, device=device, dtype=dtype).contiguous(
        memory_format=fmt)
    target = torch.randint(0, 1000, (args.frozen_batch,), device=device)
    counters["inductor"]["efficient_conv_bn_eval"] = 0
    title = (f"### Frozen-BN fine-tuning (eval mode, parameters trained): ResNet-50, batch {args.frozen_batch} "
             f"at {args.size} px, {args.frozen_dtype}, {'channels_last' if args.frozen_channels_last else 'NCHW'}, "
             "SGD step included")
    for group in split_compiled(contenders):
        if group:
            measure_group(group, make_trainer, x, target, reference, args, dtype, "frozen-BN fine-tuning", title,
                          emit)
    if not args.no_compile:
        emit(["", f"Inductor's efficient_conv_bn_eval pass rewrote {counters['inductor']['efficient_conv_bn_eval']} "
                  "conv+BN calls (counters['inductor']; ResNet-50 has 53 pairs)."])


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


def device_microseconds(fn, repeats, device):
    """{CUDA kernel name: (total microseconds, launches)} over repeats calls
    of fn, as the profiler times the kernels (launch gaps excluded)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    sync(device)
    # (On the CPU no kernel is a CUDA one: the result is empty.)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    return {e.key: (e.device_time_total, e.count) for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA}


def bench_bandwidth(args, device, emit):
    names = args.bandwidth_shapes.split(";")
    known = {s[0]: s for s in RESNET50_SHAPES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--bandwidth-shapes: unknown {unknown}; the names are bench_gpu.RESNET50_SHAPES': "
                         + "; ".join(known))
    passes = ("statistics", "normalize", "backward sums", "backward input gradient")
    batch, dtype = args.bandwidth_batch, getattr(torch, args.dtype)
    lines = ["", f"### Batch-norm passes alone: bytes moved / kernel time, against a device-to-device copy of "
                 f"the conv output's size (batch {batch}, {args.dtype}; kernel times from the profiler, "
                 "launch gaps excluded, for the passes and the copy alike)", "",
             "| shape | conv output | layout | mode | copy | " + " | ".join(passes) + " |",
             "|---|---|---|---|---|" + "---|" * len(passes)]
    fractions = []
    for name in names:
        _, cin, cout, k, s, hw = known[name]
        for layout in ("channels_last", "nchw"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            torch.manual_seed(0)
            conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
            bn = nn.BatchNorm2d(cout)
            x = torch.randn(batch, cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
            x.requires_grad_()
            for memory_efficient in (True, False):
                layer = convbn.ConvBN2d.from_modules(conv, bn, memory_efficient).to(device, dtype).to(
                    memory_format=fmt)
                out = layer(x)
                grad = torch.randn_like(out)
                y_bytes = out.numel() * out.element_size()
                src, dst = torch.randn_like(out), torch.empty_like(out)
                copy_times = device_microseconds(lambda: dst.copy_(src), args.repeats, device)
                copy_micros = sum(t for t, _ in copy_times.values()) / args.repeats
                copy_bw = 2 * y_bytes / (copy_micros * 1e-6) if copy_micros > 0 else float("nan")
                del src, dst

                def step():
                    x.grad = None
                    layer(x).backward(grad)
                totals, unknown = pass_totals(device_microseconds(step, args.repeats, device), y_bytes)
                if unknown:
                    print("convbn kernels of no known pass (KERNEL_PASSES):", *unknown, sep="\n  ", flush=True)
                if device.type == "cuda" and (copy_micros <= 0 or not totals):
                    raise RuntimeError(f"the profiler timed no {'copy' if copy_micros <= 0 else 'convbn'} kernel "
                                       f"({name}, {layout}): no CUDA activity recorded (CUPTI)?")
                cells = []
                for what in passes:
                    moved, micros = totals.get(what, (0, 0.0))
                    if micros <= 0:
                        cells.append("-")
                        continue
                    bw = moved / (micros * 1e-6)
                    fractions.append(bw / copy_bw)
                    cells.append(f"{bw / 1e12:.2f} TB/s ({bw / copy_bw:.0%})")
                mode = "memory-efficient" if memory_efficient else "save-output"
                lines.append(f"| {name} | {mib(y_bytes)} | {layout} | {mode} | "
                             + (f"{copy_bw / 1e12:.2f} TB/s" if copy_micros > 0 else "-") + " | "
                             + " | ".join(cells) + " |")
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
    parser.add_argument("--batch", type=int, default=128, help="training batch")
    parser.add_argument("--size", type=int, default=224, help="image size")
    parser.add_argument("--dtype", default="bfloat16",
                        help="training: the autocast dtype, or float32 for none; bandwidth: the dtype")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--check-batch", type=int, default=16,
                        help="images of the batch that the float32 check (output and gradients) runs on")
    parser.add_argument("--no-compile", action="store_true", help="leave the torch.compile contenders out")
    parser.add_argument("--budget-gb", type=float, default=40.0, help="0: no largest-batch search")
    parser.add_argument("--budget-compile", action="store_true",
                        help="also search the compiled contenders' largest batch (a compile per batch tried)")
    parser.add_argument("--granularity", type=int, default=32)
    parser.add_argument("--frozen-batch", type=int, default=64)
    parser.add_argument("--frozen-dtype", default="float32")
    parser.add_argument("--frozen-channels-last", action="store_true")
    parser.add_argument("--bandwidth-batch", type=int, default=512,
                        help="large enough that each conv output is several times the L2 cache (50 MB on an H200): "
                             "205 MB and more for the default shapes")
    parser.add_argument("--bandwidth-shapes", default="l1 1x1 64-256;l1 3x3 64-64;l2 1x1 128-512;l3 1x1 256-1024",
                        help="';'-separated names from bench_gpu.RESNET50_SHAPES")
    parser.add_argument("--markdown", help="append the tables here")
    args = parser.parse_args()

    device = torch.device(args.device)
    sections = args.sections.split(",")
    runs = {"train": bench_train, "frozen": bench_frozen, "bandwidth": bench_bandwidth}
    for s in sections:
        if s not in runs:
            parser.error(f"--sections: unknown section {s!r} (train, frozen, bandwidth)")
    where = device_description(device)
    emit = emitter(args.markdown)
    emit(["", f"## Whole networks ({where}; torch {torch.__version__}; date {datetime.date.today().isoformat()}; "
              f"medians of {args.repeats} repeats; TF32 for float32 convolutions: "
              f"{torch.backends.cudnn.allow_tf32})"])
    failed = []
    for section in sections:  # in the order given: each table is written when done
        t0 = time.perf_counter()
        try:
            runs[section](args, device, emit)
        except Exception as error:  # noqa: BLE001 (reported; the other sections still run)
            failed.append(section)
            traceback.print_exc()
            emit(["", f"**{section}: FAILED** ({type(error).__name__}: {str(error).splitlines()[0][:300]})"])
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"section {section}: {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        sys.exit(f"bench_gpu_networks: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
