"""SyncConvBN2d, SyncLinearBN1d and convert_sync_batchnorm across processes
(gloo on CPU): each rank's output, input grad, parameter grads and running
statistics against one process running nn.Conv2d + nn.BatchNorm2d (or
nn.Linear + nn.BatchNorm1d), float64, on the concatenated batch. The processes are started and stopped by
sync_workers.launch, which bounds each launch in time; each launch runs
several configurations."""

import pytest
import torch
from torch import nn

import convbn
from conftest import assert_close_to_reference, requires_cuda
from sync_workers import (
    batch, launch, loss_weights, make_activation, make_net, make_pair, rank_slice, sync_module_type,
)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this PyTorch build has no torch.distributed"
)

F64 = torch.float64

# (world size, configurations). Uneven batches everywhere; an empty rank in
# the 3-process ones; every option of the layer somewhere.
LAYER_CONFIGS = {
    2: [
        {"sizes": [3, 5]},
        {"sizes": [2, 6], "bias": True, "momentum": None, "memory_efficient": False, "channels_last": True},
        {"sizes": [1, 4], "spatial": (1, 1), "padding": 0, "kernel_size": 1, "eps": 1e-3},
        {"sizes": [3, 5], "kind": "linear", "in_channels": 7, "out_channels": 5, "bias": True},
        # The fused activation: it is applied to the synchronized batch
        # norm's output, and its backward runs before the gradient sums.
        {"sizes": [3, 2], "out_channels": 5, "bias": True, "activation": "silu"},
        {"sizes": [3, 2], "out_channels": 5, "bias": True, "activation": "leaky_relu", "negative_slope": -0.5,
         "memory_efficient": False},
        {"sizes": [3, 2], "out_channels": 5, "activation": "relu6", "channels_last": True},
    ],
    3: [
        {"sizes": [4, 1, 3], "in_channels": 4, "out_channels": 6, "groups": 2, "stride": 2, "dilation": 2,
         "padding": 2, "affine": False},
        {"sizes": [3, 0, 4]},
        {"sizes": [0, 5, 2], "bias": True, "track_running_stats": False, "memory_efficient": False},
        {"sizes": [2, 0, 6], "kind": "linear", "momentum": None, "memory_efficient": False, "affine": False},
    ],
}
LAYER_CASES = [(world, i) for world, configs in LAYER_CONFIGS.items() for i in range(len(configs))]


@pytest.fixture(scope="module")
def layer_records():
    """launch() once per world size; records[world][rank][config index]."""
    return {world: launch(world, "sync_layer_steps", configs) for world, configs in LAYER_CONFIGS.items()}


def reference_layer_steps(config):
    """What the ranks did, in one process on the concatenated batches, with
    the nn pair (and activation)."""
    conv, bn = make_pair(config)
    activation = make_activation(config) or nn.Identity()
    conv.train()
    bn.train()
    steps = []
    for step in range(config.get("steps", 3)):
        x = batch(config, step, config["sizes"]).requires_grad_()
        conv.zero_grad()
        bn.zero_grad()
        y = activation(bn(conv(x)))
        (loss_weights(y.shape, step) * y).sum().backward()
        grads = {"weight": conv.weight.grad, "bias": conv.bias.grad if conv.bias is not None else None}
        if bn.affine:
            grads.update(bn_weight=bn.weight.grad, bn_bias=bn.bias.grad)
        steps.append({"output": y.detach(), "grad_input": x.grad, "grads": grads, "state": fused_state(conv, bn)})
    return steps, fused_state(conv, bn)


def fused_state(conv, bn):
    """The pair's state_dict under the fused module's names."""
    state = {f"bn_{k}" if k in ("weight", "bias") else k: v.detach().clone() for k, v in bn.state_dict().items()}
    state.update({k: v.detach().clone() for k, v in conv.state_dict().items()})
    return state


@pytest.mark.parametrize("world,index", LAYER_CASES, ids=[f"{w}ranks-{i}" for w, i in LAYER_CASES])
def test_sync_layer_matches_one_process_on_the_concatenated_batch(layer_records, world, index):
    config = LAYER_CONFIGS[world][index]
    sizes = config["sizes"]
    records = [layer_records[world][rank][index] for rank in range(world)]
    for rank, record in enumerate(records):
        assert "error" not in record, f"rank {rank}: {record.get('error')}"
    expected_steps, expected_state = reference_layer_steps(config)

    for step, expected in enumerate(expected_steps):
        for rank, record in enumerate(records):
            got = record["steps"][step]
            where = f"step {step}, rank {rank}"
            op = "convbn.sync_linear_bn_train" if config.get("kind") == "linear" else "convbn.sync_conv_bn_train"
            assert op in got["ops"], f"{where}: did not synchronize: {got['ops']}"
            part = rank_slice(sizes, rank)
            assert got["output"].shape == expected["output"][part].shape
            assert_close_to_reference(got["output"], expected["output"][part], F64, f"{where}: output")
            assert_close_to_reference(got["grad_input"], expected["grad_input"][part], F64, f"{where}: grad_input")
            # The state after each step (running statistics and
            # num_batches_tracked; no optimizer moves the parameters) is the
            # one process's.
            assert got["state"].keys() == expected["state"].keys()
            for name, value in expected["state"].items():
                assert_close_to_reference(got["state"][name], value, F64, f"{where}: {name}")
        # Parameter grads are per rank (DDP reduces them): their sum over the
        # ranks is the one-process gradient.
        for name, grad in expected["grads"].items():
            if grad is None:
                continue
            summed = sum(record["steps"][step]["grads"][name] for record in records)
            assert_close_to_reference(summed, grad, F64, f"step {step}: sum of {name} grads")

    for rank, record in enumerate(records):
        assert record["state"].keys() == expected_state.keys()
        for name, value in expected_state.items():
            assert_close_to_reference(record["state"][name], value, F64, f"rank {rank}: {name}")
            # Identical on every rank, to the bit.
            assert torch.equal(record["state"][name], records[0]["state"][name]), f"{name} differs between ranks"


DDP_CASES = {2: [3, 5], 3: [2, 0, 4]}  # samples per rank


@pytest.mark.parametrize("world", sorted(DDP_CASES))
def test_ddp_training_matches_one_process(world):
    """convert_sync_batchnorm(fuse(net)) under DistributedDataParallel (gloo):
    three SGD steps give every rank the parameters and running statistics of
    one process training the nn net on the concatenated batches (DDP averages
    the ranks' gradients, so the reference's loss is divided by the number
    of ranks)."""
    sizes = DDP_CASES[world]
    config = {"sizes": sizes, "steps": 3, "lr": 0.1}
    records = [r[0] for r in launch(world, "ddp_training", [config])]
    for rank, record in enumerate(records):
        assert "error" not in record, f"rank {rank}: {record.get('error')}"
        assert {"SyncConvBN2d", "SyncLinearBN1d"} <= set(record["types"])
        assert not {"ConvBN2d", "LinearBN1d", "BatchNorm1d", "BatchNorm2d"} & set(record["types"])

    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=config["lr"])
    for step in range(config["steps"]):
        optimizer.zero_grad()
        y = net(batch(config, step, sizes))
        (loss_weights(y.shape, step) * y).sum().div(world).backward()
        optimizer.step()
        for rank, record in enumerate(records):
            assert_close_to_reference(
                record["outputs"][step], y.detach()[rank_slice(sizes, rank)], F64, f"step {step}, rank {rank}"
            )
    net.eval()
    expected_state = convbn.fuse(net).state_dict()
    with torch.no_grad():
        expected_eval = net(batch(config, 99, [4]))
    for rank, record in enumerate(records):
        assert record["state"].keys() == expected_state.keys()
        for name, value in expected_state.items():
            assert_close_to_reference(record["state"][name], value, F64, f"rank {rank}: {name}")
            assert torch.equal(record["state"][name], records[0]["state"][name]), f"{name} differs between ranks"
        assert_close_to_reference(record["eval_output"], expected_eval, F64, f"rank {rank}: eval output")


def test_recalibrate_gives_every_rank_the_statistics_of_all_ranks_data():
    """convbn.recalibrate on a synchronized model, 3 ranks with uneven and
    empty slices: every rank's running statistics are the mean and unbiased
    variance of each batch norm's input over all ranks' batches, taken
    directly from an unfused nn copy run on the concatenated batches, and
    identical on every rank."""
    config = {"sizes": [3, 0, 4], "batches": 3}
    records = [r[0] for r in launch(3, "recalibrate_synchronized", [config])]
    for rank, record in enumerate(records):
        assert "error" not in record, f"rank {rank}: {record.get('error')}"

    net = make_net()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, []).append(args[0]))
             for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for step in range(config["batches"]):
            net(batch(config, step, config["sizes"]))
    for hook in hooks:
        hook.remove()
    for bn, values in inputs.items():
        values = torch.cat(values)
        dims = (0,) if values.dim() == 2 else (0, 2, 3)
        bn.running_mean.copy_(values.mean(dims))
        bn.running_var.copy_(values.var(dims, unbiased=True))
        bn.num_batches_tracked.zero_()
    expected = convbn.fuse(net).state_dict()
    for rank, record in enumerate(records):
        for name, value in expected.items():
            if "running" in name:
                assert_close_to_reference(record["state"][name], value, F64, f"rank {rank}: {name}")
                assert torch.equal(record["state"][name], records[0]["state"][name]), name
            else:  # parameters and num_batches_tracked stay as they were
                assert torch.equal(record["state"][name], value), name


def test_no_communication_in_eval_or_with_one_rank():
    """Rank 0 runs alone while rank 1 runs nothing (a collective would wait
    for rank 1 until the group's timeout): in eval over the world group, and
    in training over a one-rank group, it computes exactly what ConvBN2d
    computes and calls no synchronized op."""
    record = launch(2, "runs_alone", [{}])[0][0]
    assert "error" not in record, record.get("error")
    for mode in ("eval", "one_rank"):
        assert torch.equal(record[mode], record[mode + "_plain"]), mode
        assert not any("sync" in name for name in record[mode + "_ops"]), record[mode + "_ops"]
        sync_state, plain_state = record[mode + "_state"]
        for name in plain_state:
            assert torch.equal(sync_state[name], plain_state[name]), f"{mode}: {name}"
    assert any(name == "convbn.update_running_stats" for name in record["one_rank_ops"])


def test_too_few_values_fail_alike_on_every_rank_and_leave_the_statistics():
    """One value per channel over the group, or an empty batch on every
    rank: each rank raises nn.BatchNorm's error (none waits for another)
    and no statistics change. Two values over the group are enough."""
    one_value = {"spatial": (1, 1), "padding": 0, "kernel_size": 1}
    configs = [
        dict(one_value, sizes=[1, 0]), dict(one_value, sizes=[0, 0]), {"kind": "linear", "sizes": [0, 1]},
        dict(one_value, sizes=[1, 1]), {"kind": "linear", "sizes": [1, 1]},
    ]
    records = launch(2, "too_few_values", configs)
    for rank in range(2):
        for index, config in enumerate(configs):
            record = records[rank][index]
            if sum(config["sizes"]) < 2:
                assert record["error"] is not None, record
                assert "Expected more than 1 value per channel" in record["error"], record
                assert record["error_type"] == "ValueError", record  # as nn.SyncBatchNorm raises it
                assert record["unchanged"], f"rank {rank}, {config}: statistics changed"
            else:
                assert record["error"] is None, record
                assert not record["unchanged"]


def test_opcheck_and_no_double_backward():
    record = launch(1, "op_checks", [{}])[0][0]
    assert "error" not in record, record.get("error")
    assert record["failures"] == []
    assert record["double_backward_error"] is not None
    assert "double backward" in record["double_backward_error"]


# ---------------------------------------------------------------------------
# One process, no process group.

@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_without_a_process_group_it_is_the_per_process_module(kind):
    """torch.distributed not initialized: training and eval are ConvBN2d's
    (LinearBN1d's)."""
    config = {"kind": kind}
    pair = make_pair(config)
    sync = sync_module_type(config).from_modules(*pair)
    plain = (convbn.LinearBN1d if kind == "linear" else convbn.ConvBN2d).from_modules(*pair)
    x = batch(config, 0, [4])
    for training in (True, False):
        sync.train(training)
        plain.train(training)
        assert torch.equal(sync(x), plain(x))
    for name, value in plain.state_dict().items():
        assert torch.equal(sync.state_dict()[name], value), name


def test_convert_sync_batchnorm_shares_the_layers_state():
    model = convbn.fuse(make_net())
    fused_types = (convbn.ConvBN2d, convbn.LinearBN1d)
    layers = [m for m in model.modules() if isinstance(m, fused_types)]
    model.eval()
    converted = convbn.convert_sync_batchnorm(model)
    assert converted is model
    synced = [m for m in converted.modules() if isinstance(m, fused_types)]
    assert [type(m) for m in synced] == [convbn.SyncConvBN2d, convbn.SyncConvBN2d, convbn.SyncLinearBN1d]
    for old, new in zip(layers, synced):
        assert not new.training
        assert new.process_group is None
        for (name, a), (_, b) in zip(old.named_parameters(), new.named_parameters()):
            assert a is b, name  # shared, as nn.SyncBatchNorm.convert_sync_batchnorm shares them
        for (name, a), (_, b) in zip(old.named_buffers(), new.named_buffers()):
            assert a is b, name
        assert old.extra_repr() == new.extra_repr()
    # unfuse still finds where each pair lived.
    original = make_net()
    original.load_state_dict(convbn.unfuse(converted).state_dict())
    assert type(original[1]) is nn.BatchNorm2d

    group = object()  # process_group is only stored until forward
    single = convbn.convert_sync_batchnorm(convbn.ConvBN2d(3, 4, 3), group)
    assert type(single) is convbn.SyncConvBN2d and single.process_group is group
    single = convbn.convert_sync_batchnorm(convbn.LinearBN1d(3, 4), group)
    assert type(single) is convbn.SyncLinearBN1d and single.process_group is group
    bn = nn.BatchNorm2d(4)
    assert convbn.convert_sync_batchnorm(nn.Sequential(bn))[0] is bn  # nn's own converter does these


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_scripted_sync_layer_runs_unsynchronized(kind):
    config = {"kind": kind}
    sync = sync_module_type(config).from_modules(*make_pair(config)).eval()
    scripted = torch.jit.script(sync)
    x = batch(config, 0, [4])
    assert torch.equal(scripted(x), sync(x))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(group_size=0), r"`group_size` must be the number of ranks"),
        (dict(group_name=""), r"`group_name` is empty"),
    ],
)
def test_sync_op_argument_errors(changes, message):
    conv, bn = make_pair({})
    args = dict(
        input=batch({}, 0, [4]), weight=conv.weight, bias=None, bn_weight=bn.weight, bn_bias=bn.bias,
        stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, eps=1e-5, group_name="0", group_size=2,
    )
    args.update(changes)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.convbn.sync_conv_bn_train(*args.values())


# ---------------------------------------------------------------------------
# CUDA: against nn.SyncBatchNorm after an nn.Conv2d.

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_nn_sync_batch_norm(dtype):
    """Two processes on the GPU(s): NCCL when there are two devices, else
    gloo on the shared one. SyncConvBN2d against nn.Conv2d +
    nn.SyncBatchNorm with the same state, on uneven batches."""
    world = 2
    backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    config = {"sizes": [3, 5], "dtype": dtype, "steps": 2}
    records = [r[0] for r in launch(world, "cuda_against_nn_sync", [config], backend=backend)]
    for rank, record in enumerate(records):
        assert "error" not in record, f"rank {rank}: {record.get('error')}"
        for step, (ours, theirs) in enumerate(zip(record["ours"], record["theirs"])):
            for name in theirs:
                assert_close_to_reference(ours[name], theirs[name], dtype, f"rank {rank}, step {step}: {name}")
        for name, value in record["their_state"].items():
            assert_close_to_reference(record["our_state"][name], value, dtype, f"rank {rank}: {name}")
