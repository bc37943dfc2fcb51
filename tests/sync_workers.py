"""The process side of tests/test_distributed.py: `launch` starts one process
per rank (spawn), joins a gloo process group through a file store, runs a
scenario in each, and returns what each rank recorded. The test process
compares those records with its own single-process reference: nothing here
asserts.

Every launch is bounded: the process group's timeout turns a collective that
waits forever into an error, and `launch` kills the processes and fails
when they are not done by its deadline."""

import copy
import datetime
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import convbn

# How long a collective may wait before gloo raises, and how long a launch
# may take in all (startup of each process included).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
LAUNCH_TIMEOUT = 240.0


def launch(world_size, scenario, configs, backend="gloo"):
    """Runs scenario(rank, world_size, config) for each config on every rank
    of a fresh world_size-process group (gloo, or nccl with one GPU per
    rank). Returns records[rank][i], the i-th config's record on that rank (a
    dict, or the exception text under "error" when the scenario raised)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_main, args=(rank, world_size, backend, store, scenario, configs, tmp), daemon=True
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0))
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise AssertionError(f"ranks {hung} of {world_size} did not finish within {LAUNCH_TIMEOUT} s")
        records = []
        for rank, p in enumerate(procs):
            path = os.path.join(tmp, f"rank{rank}.pt")
            if p.exitcode != 0 or not os.path.exists(path):
                crash = os.path.join(tmp, f"rank{rank}.err")
                text = open(crash).read() if os.path.exists(crash) else "(no traceback)"
                raise AssertionError(f"rank {rank} exited with {p.exitcode}:\n{text}")
            records.append(torch.load(path, weights_only=False))
        return records


def _main(rank, world_size, backend, store, scenario, configs, out_dir):
    try:
        torch.set_num_threads(1)
        # The tests' float32 comparisons are for float32 arithmetic: TF32
        # off, as conftest.py sets it in the parent for every test.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        records = []
        for config in configs:
            try:
                records.append(SCENARIOS[scenario](rank, world_size, config))
            except Exception as e:  # recorded: the test decides whether it was expected
                records.append({"error": f"{type(e).__name__}: {e}"})
                print(f"rank {rank}, {scenario} {config}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            dist.barrier()
        torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


# ---------------------------------------------------------------------------
# What the ranks and the reference share: the layer, the data, the losses.

def is_linear(config):
    return config.get("kind", "conv") == "linear"


def make_pair(config):
    """The reference pair in float64: (nn.Conv2d, nn.BatchNorm2d), or
    (nn.Linear, nn.BatchNorm1d) when config["kind"] is "linear", with
    randomized batch-norm parameters and statistics; the same on every rank
    and in the test process."""
    torch.manual_seed(0)
    out_channels = config.get("out_channels", 4)
    if is_linear(config):
        layer = nn.Linear(config.get("in_channels", 3), out_channels, bias=config.get("bias", False),
                          dtype=torch.float64)
    else:
        layer = nn.Conv2d(
            config.get("in_channels", 3), out_channels, config.get("kernel_size", 3),
            stride=config.get("stride", 1), padding=config.get("padding", 1), dilation=config.get("dilation", 1),
            groups=config.get("groups", 1), bias=config.get("bias", False), dtype=torch.float64,
        )
    bn = (nn.BatchNorm1d if is_linear(config) else nn.BatchNorm2d)(
        out_channels, eps=config.get("eps", 1e-5), momentum=config.get("momentum", 0.1),
        affine=config.get("affine", True), track_running_stats=config.get("track_running_stats", True),
        dtype=torch.float64,
    )
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return layer, bn


def sync_module_type(config):
    return convbn.SyncLinearBN1d if is_linear(config) else convbn.SyncConvBN2d


def make_activation(config):
    """The nn activation after the pair (config["activation"], built by the
    tests, not by convbn), or None."""
    from conftest import nn_activation

    name = config.get("activation")
    return None if name is None else nn_activation(name, config.get("negative_slope", 0.01))


def batch(config, step, sizes):
    """Step `step`'s whole batch (all ranks' samples, concatenated)."""
    generator = torch.Generator().manual_seed(1000 + step)
    spatial = () if is_linear(config) else config.get("spatial", (6, 5))
    x = torch.randn(sum(sizes), config.get("in_channels", 3), *spatial,
                    generator=generator, dtype=torch.float64) * 2 + 0.5
    if config.get("channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def loss_weights(shape, step):
    """Fixed random weights w: the loss of an output y is sum(w * y)."""
    generator = torch.Generator().manual_seed(2000 + step)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def rank_slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def make_net():
    """A small nn network (float64) on (N, 3, 6, 5) input with two Conv2d ->
    BatchNorm2d pairs and a Linear -> BatchNorm1d pair."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(5, momentum=None), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 3 * 3, 6), nn.BatchNorm1d(6),
    ).double()


# ---------------------------------------------------------------------------
# Scenarios: scenario(rank, world_size, config) -> record.

def _state(module):
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def sync_layer_steps(rank, world_size, config):
    """The synchronized module made from make_pair(config) (and
    make_activation's module), trained for config["steps"]
    steps on this rank's slice of each step's batch, with loss sum(w * y) on
    the slice (no DDP: parameter grads are this rank's own). Records per
    step the output, input grad, parameter grads and state; then the state."""
    sizes = config["sizes"]
    activation = {} if make_activation(config) is None else {"activation": make_activation(config)}
    layer = sync_module_type(config).from_modules(
        *make_pair(config), memory_efficient=config.get("memory_efficient", True), **activation
    )
    layer.train()
    steps = []
    for step in range(config.get("steps", 3)):
        x = batch(config, step, sizes)[rank_slice(sizes, rank)].clone().requires_grad_()
        layer.zero_grad()
        with OpLog() as log:
            y = layer(x)
        w = loss_weights((sum(sizes), *y.shape[1:]), step)[rank_slice(sizes, rank)]
        (w * y).sum().backward()
        steps.append({
            "output": y.detach(), "grad_input": x.grad,
            "grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
            "ops": log.names, "state": _state(layer),
        })
    return {"steps": steps, "state": _state(layer)}


def ddp_training(rank, world_size, config):
    """make_net(), fused by convbn.fuse and converted by
    convbn.convert_sync_batchnorm, trained under DistributedDataParallel
    (gloo) with SGD for config["steps"] steps on this rank's slices. Records
    each step's output and the final state."""
    sizes = config["sizes"]
    model = convbn.convert_sync_batchnorm(convbn.fuse(make_net()))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=config.get("lr", 0.1))
    outputs = []
    for step in range(config.get("steps", 3)):
        x = batch(config, step, sizes)[rank_slice(sizes, rank)]
        optimizer.zero_grad()
        y = ddp(x)
        w = loss_weights((sum(sizes), *y.shape[1:]), step)[rank_slice(sizes, rank)]
        (w * y).sum().backward()
        optimizer.step()
        outputs.append(y.detach())
    model.eval()
    with torch.no_grad():
        eval_output = model(batch(config, 99, [4]))
    return {
        "outputs": outputs, "state": _state(model), "eval_output": eval_output,
        "types": sorted({type(m).__name__ for m in model.modules()}),
    }


def recalibrate_synchronized(rank, world_size, config):
    """convbn.recalibrate on convert_sync_batchnorm(fuse(make_net())), each
    rank passing its slices of config["batches"] batches (sizes per rank in
    config["sizes"]). Records the state."""
    sizes = config["sizes"]
    model = convbn.convert_sync_batchnorm(convbn.fuse(make_net()))
    batches = [batch(config, step, sizes)[rank_slice(sizes, rank)] for step in range(config["batches"])]
    convbn.recalibrate(model, batches, progress=False)
    return {"state": _state(model)}


def runs_alone(rank, world_size, config):
    """Rank 0 alone runs a SyncConvBN2d in eval mode over the world group,
    and in training mode over a group of its own (one rank), while the other
    ranks run nothing: if either communicated, it would wait for ranks that
    never come and fail at the group's timeout. Records rank 0's outputs,
    those of a plain ConvBN2d with the same state, and the ops it called."""
    solo = dist.new_group([0])  # every rank must take part in new_group
    if rank != 0:
        return {}
    pair = make_pair(config)
    x = batch(config, 0, [5])
    record = {}
    for mode, group in (("eval", None), ("one_rank", solo)):
        sync = convbn.SyncConvBN2d.from_modules(*pair)
        sync.process_group = group
        plain = convbn.ConvBN2d.from_modules(*pair)
        sync.train(mode != "eval")
        plain.train(mode != "eval")
        with OpLog() as log:
            record[mode] = sync(x)
        record[mode + "_plain"] = plain(x)
        record[mode + "_ops"] = log.names
        record[mode + "_state"] = (_state(sync), _state(plain))
    return record


def too_few_values(rank, world_size, config):
    """One forward whose group holds config["sizes"] samples of 1x1 output:
    records the error (if any) and whether the statistics changed."""
    sizes = config["sizes"]
    layer = sync_module_type(config).from_modules(*make_pair(config))
    before = _state(layer)
    x = batch(config, 0, sizes)[rank_slice(sizes, rank)]
    try:
        layer(x)
        error, error_type = None, None
    except (RuntimeError, ValueError) as e:
        error, error_type = str(e), type(e).__name__
    after = _state(layer)
    return {"error": error, "error_type": error_type,
            "unchanged": all(torch.equal(before[k], after[k]) for k in before)}


def op_checks(rank, world_size, config):
    """torch.library.opcheck on the synchronized ops over this group, and the
    double-backward error. Records the failures as text."""
    group_name = dist.group.WORLD.group_name
    mask = [True, True, False, True, True]
    conv, bn = make_pair({})
    x = batch({}, 0, [4]).requires_grad_()
    linear, bn1d = make_pair({"kind": "linear"})
    rows = batch({"kind": "linear"}, 0, [5]).requires_grad_()
    samples = []  # (op name, forward arguments, backward arguments after grad_output)
    for memory_efficient in (True, False):
        samples.append(("sync_conv_bn_train",
                        (x, conv.weight, conv.bias, bn.weight, bn.bias, [1, 1], [1, 1], [1, 1], 1, 1e-5,
                         group_name, world_size, memory_efficient),
                        lambda kept, stats, count: (x.detach(), conv.weight.detach(), None, bn.weight.detach(),
                                                    kept, *stats, [1, 1], [1, 1], [1, 1], 1, 1e-5, group_name,
                                                    world_size, count, mask)))
        samples.append(("sync_linear_bn_train",
                        (rows, linear.weight, linear.bias, bn1d.weight, bn1d.bias, 1e-5, group_name, world_size,
                         memory_efficient),
                        lambda kept, stats, count: (rows.detach(), linear.weight.detach(), None,
                                                    bn1d.weight.detach(), kept, *stats, 1e-5, group_name,
                                                    world_size, count, mask)))
    failures = []
    for name, args, backward_args in samples:
        forward, backward = getattr(torch.ops.convbn, name), getattr(torch.ops.convbn, name + "_backward")
        with torch.no_grad():
            out, mean, invstd, kept, count = forward(*args)
        grad_args = (torch.randn_like(out), *backward_args(kept, (mean, invstd), count))
        for op, op_args in ((forward, args), (backward, grad_args)):
            try:
                torch.library.opcheck(op.default, op_args)
            except Exception as e:
                failures.append(f"{op}: {e}")
    # Through the op: a one-rank SyncConvBN2d would not synchronize at all.
    y = torch.ops.convbn.sync_conv_bn_train(*samples[0][1])[0]
    try:
        torch.autograd.grad(y.sum(), x, create_graph=True)
        double_backward_error = None
    except RuntimeError as e:
        double_backward_error = str(e)
    return {"failures": failures, "double_backward_error": double_backward_error}


def cuda_against_nn_sync(rank, world_size, config):
    """SyncConvBN2d against nn.Conv2d + nn.SyncBatchNorm with the same state,
    on CUDA, in config["dtype"]: records both sides' output, input grad and
    parameter grads per step, and their final states (fused names), on the
    CPU."""
    device = torch.device("cuda", rank % torch.cuda.device_count())
    dtype, sizes = config["dtype"], config["sizes"]
    conv, bn = make_pair(config)
    ours = convbn.SyncConvBN2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn)).to(device, dtype)
    their_conv = copy.deepcopy(conv).to(device, dtype)
    their_bn = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bn)).to(device, dtype)
    record = {"ours": [], "theirs": []}
    for step in range(config.get("steps", 2)):
        x = batch(config, step, sizes)[rank_slice(sizes, rank)].to(device, dtype)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours.zero_grad()
        their_conv.zero_grad()
        their_bn.zero_grad()
        y_ours, y_theirs = ours(x_ours), their_bn(their_conv(x_theirs))
        w = loss_weights((sum(sizes), *y_ours.shape[1:]), step)[rank_slice(sizes, rank)].to(device, dtype)
        (w * y_ours).sum().backward()
        (w * y_theirs).sum().backward()
        record["ours"].append({
            "output": y_ours.detach().cpu(), "grad_input": x_ours.grad.cpu(), "weight": ours.weight.grad.cpu(),
            "bn_weight": ours.bn_weight.grad.cpu(), "bn_bias": ours.bn_bias.grad.cpu(),
        })
        record["theirs"].append({
            "output": y_theirs.detach().cpu(), "grad_input": x_theirs.grad.cpu(),
            "weight": their_conv.weight.grad.cpu(), "bn_weight": their_bn.weight.grad.cpu(),
            "bn_bias": their_bn.bias.grad.cpu(),
        })
    record["our_state"] = {k: v.cpu() for k, v in _state(ours).items()}
    their_state = {f"bn_{k}" if k in ("weight", "bias") else k: v for k, v in _state(their_bn).items()}
    their_state.update(_state(their_conv))
    record["their_state"] = {k: v.cpu() for k, v in their_state.items()}
    return record


def float32_slices(rank, world_size, config):
    """One float32 training step of the synchronized module made from
    config["layer"] and config["bn"] (float64 nn modules) on this rank's
    slice of config["x"], loss sum(w * y) with config["w"]'s slice; the
    module's synchronized op runs whatever the group's size. Records the
    output, input grad, parameter grads and running statistics."""
    sizes = config["sizes"]
    layer = sync_module_type(config).from_modules(
        copy.deepcopy(config["layer"]), copy.deepcopy(config["bn"]),
        memory_efficient=config["memory_efficient"],
    ).to(torch.float32)
    x = config["x"][rank_slice(sizes, rank)].to(torch.float32)
    w = config["w"][rank_slice(sizes, rank)].to(torch.float32)
    if config.get("channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with OpLog() as log:
        y = layer(x)
    assert any("sync" in name for name in log.names), log.names
    (w * y).sum().backward()
    return {
        "output": y.detach(), "grad_input": x.grad,
        "grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
        "running_mean": layer.running_mean.clone(), "running_var": layer.running_var.clone(),
    }


SCENARIOS = {
    "float32_slices": float32_slices,
    "recalibrate_synchronized": recalibrate_synchronized,
    "cuda_against_nn_sync": cuda_against_nn_sync,
    "sync_layer_steps": sync_layer_steps,
    "ddp_training": ddp_training,
    "runs_alone": runs_alone,
    "too_few_values": too_few_values,
    "op_checks": op_checks,
}


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the operators called at the top level."""

    def __enter__(self):
        self.names = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
