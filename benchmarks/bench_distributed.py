"""Communication overhead of SyncConvBN2d: two processes with gloo on the CPU.

Each process trains on its own batch (the same size on both). Per conv+BN
(and linear+BN) shape it times one training step (forward + backward) of
  - nn.Conv2d + nn.BatchNorm2d   (per-process statistics; the reference)
  - ConvBN2d                     (per-process statistics, no communication)
  - SyncConvBN2d                 (statistics over both processes: one
                                  all-gather forward, one all-reduce backward)
(nn.Linear + nn.BatchNorm1d, LinearBN1d and SyncLinearBN1d for the linear
shape)
and, for a whole network, one DistributedDataParallel step of convbn's
ResNet-18 with ConvBN2d and with SyncConvBN2d layers (DDP's own gradient
all-reduce is in both). For comparison it also times the two collectives
alone (the all-gather of 2C+1 float64 values per rank and the all-reduce of
2C), with the per-channel vectors of each shape. Contenders alternate within each repeat, every
timed call starts at a barrier, and rank 0 reports medians. Ratios are
against the reference measured in the same run. Each process uses
--threads threads (default: the cores divided by two).

    python3 benchmarks/bench_distributed.py --markdown benchmarks/distributed_results.md
"""

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import convbn

WORLD = 2
# (name, in_channels, out_channels, kernel, stride, padding, batch per process,
# height/width); kernel None is a linear layer on (batch, in_channels).
SHAPES = [
    ("LeNet fc1 (400->120, linear)", 400, 120, None, None, None, 128, None),
    ("LeNet conv2 (6->16, 5x5)", 6, 16, 5, 1, 0, 128, 14),
    ("ResNet-18 layer1 (64->64, 3x3)", 64, 64, 3, 1, 1, 8, 56),
    ("ResNet-18 layer3 (256->256, 3x3)", 256, 256, 3, 1, 1, 8, 14),
    ("ResNet-50 layer4 (512->2048, 1x1)", 512, 2048, 1, 1, 0, 8, 7),
]


def timed(fn, repeats_out, key):
    dist.barrier()
    start = time.perf_counter()
    fn()
    repeats_out.setdefault(key, []).append(time.perf_counter() - start)


def layer_contenders(shape):
    """The nn pair, the fused module and its synchronized form, labelled as
    the table's columns."""
    _, cin, cout, k, stride, padding, _, _ = shape
    torch.manual_seed(0)
    if k is None:
        layer, bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)
        fused, synced = convbn.LinearBN1d, convbn.SyncLinearBN1d
    else:
        layer, bn = nn.Conv2d(cin, cout, k, stride, padding, bias=False), nn.BatchNorm2d(cout)
        fused, synced = convbn.ConvBN2d, convbn.SyncConvBN2d
    return {
        "nn pair": nn.Sequential(layer, bn),
        "ConvBN2d": fused.from_modules(layer, bn),
        "SyncConvBN2d": synced.from_modules(layer, bn),
    }


def train_step(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
    return step


def collectives_alone(channels):
    """The exchange of one synchronized layer, without the layer: the
    forward's all-gather and the backward's all-reduce."""
    stats = torch.zeros(2 * channels + 1, dtype=torch.float64)
    gathered = torch.empty(WORLD * stats.numel(), dtype=torch.float64)
    sums = torch.zeros(2 * channels, dtype=torch.float64)

    def run():
        dist.all_gather_into_tensor(gathered, stats)
        dist.all_reduce(sums)
    return run


def worker(rank, store, args, out_path):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    rows = []
    for shape in SHAPES:
        name, cin, *_, batch, size = shape
        torch.manual_seed(rank)
        x = torch.randn(batch, cin) if size is None else torch.randn(batch, cin, size, size)
        contenders = layer_contenders(shape)
        contenders["collectives alone"] = None
        times = {}
        steps = {
            label: collectives_alone(shape[2]) if module is None else train_step(module, x)
            for label, module in contenders.items()
        }
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        for _ in range(args.repeats):
            for label, step in steps.items():
                timed(step, times, label)
        shape_text = f"{batch}x{cin}" if size is None else f"{batch}x{cin}x{size}x{size}"
        rows.append((name, f"{WORLD} x {shape_text}", {k: statistics.median(v) for k, v in times.items()}))

    # A whole network under DDP: ResNet-18 (convbn.models), fused.
    torch.manual_seed(0)
    plain = convbn.fuse(convbn.models.resnet18(num_classes=10))
    synced = convbn.convert_sync_batchnorm(convbn.fuse(convbn.models.resnet18(num_classes=10)))
    nets = {
        "nn pair": nn.parallel.DistributedDataParallel(convbn.models.resnet18(num_classes=10)),
        "ConvBN2d": nn.parallel.DistributedDataParallel(plain),
        "SyncConvBN2d": nn.parallel.DistributedDataParallel(synced),
    }
    torch.manual_seed(rank)
    x = torch.randn(args.net_batch, 3, 64, 64)
    times = {}
    for _ in range(args.warmup):
        for net in nets.values():
            train_step(net, x)()
    for _ in range(max(args.repeats // 2, 3)):
        for label, net in nets.items():
            timed(train_step(net, x), times, label)
    rows.append(("ResNet-18 under DDP (20 conv+BN)", f"{WORLD} x {args.net_batch}x3x64x64",
                 {k: statistics.median(v) for k, v in times.items()}))
    if rank == 0:
        torch.save(rows, out_path)
    dist.destroy_process_group()


def markdown(rows, args):
    lines = [
        f"Two processes, gloo, CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} thread(s) per process), torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}. Medians of {args.repeats} training steps (forward + backward); "
        "ratios against the nn pair of the same run (per-process statistics, no communication).",
        "",
        "| shape | batch (processes x per process) | nn pair ms | ConvBN2d / LinearBN1d ms (ratio) "
        "| SyncConvBN2d / SyncLinearBN1d ms (ratio) "
        "| sync overhead per step, ms (vs ConvBN2d) | the two collectives alone, ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, batch, t in rows:
        ref = t["nn pair"]
        alone = f"{t['collectives alone'] * 1e3:.2f}" if "collectives alone" in t else ""
        lines.append(
            f"| {name} | {batch} | {ref * 1e3:.2f} | {t['ConvBN2d'] * 1e3:.2f} ({t['ConvBN2d'] / ref:.2f}x) "
            f"| {t['SyncConvBN2d'] * 1e3:.2f} ({t['SyncConvBN2d'] / ref:.2f}x) "
            f"| {(t['SyncConvBN2d'] - t['ConvBN2d']) * 1e3:+.2f} ({t['SyncConvBN2d'] / t['ConvBN2d']:.2f}x) "
            f"| {alone} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max((os.cpu_count() or 2) // WORLD, 1))
    parser.add_argument("--net-batch", type=int, default=8)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.pt")
        mp.start_processes(worker, args=(os.path.join(tmp, "store"), args, out_path), nprocs=WORLD,
                           start_method="spawn")
        rows = torch.load(out_path, weights_only=False)
    table = markdown(rows, args)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
