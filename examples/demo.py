"""convbn demo: d2l's LeNet with batch normalization on Fashion-MNIST,
trained twice from the same initial weights on the same batches: once with
nn.Conv2d / nn.BatchNorm2d / nn.Linear / nn.BatchNorm1d, once converted with
convbn.fuse (ConvBN2d and LinearBN1d). SGD, learning rate 1.0, batch 256,
10 epochs, as in "Dive into Deep Learning" (section "Batch Normalization").

For both models it reports loss, train and test accuracy per epoch, training
examples per second and the bytes autograd keeps for backward, draws both
learning curves into a PNG and writes a Markdown summary (--out).

    python examples/demo.py [--data DIR] [--epochs 10] [--device cpu|cuda]
"""

import argparse
import datetime
import os
import platform
import sys
import time

import torch
from torch import nn
from tqdm.auto import tqdm

import convbn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist  # noqa: E402

BOOK = {"train_acc": 0.912, "test_acc": 0.874}  # d2l's concise LeNet-BN run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=fashion_mnist.DEBIAN_DIR,
                   help="folder with the four Fashion-MNIST IDX files (default: the Debian package's; "
                        "installed when missing and possible)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N training and test images (quick runs)")
    p.add_argument("--out", default="demo_output", help="folder for the PNG and the Markdown summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(model, images, labels, order, batch_size, optimizer, device, progress, desc):
    """One pass over the training set in `order`. Returns (mean loss, train
    accuracy, examples per second)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    batches = range(0, len(order), batch_size)
    synchronize(device)
    start = time.perf_counter()
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress)
    for i in bar:
        idx = order[i:i + batch_size]
        x, y = images[idx], labels[idx]
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().double() * len(idx)
        correct += (logits.argmax(1) == y).sum()
    synchronize(device)
    seconds = time.perf_counter() - start
    n = len(order)
    return total_loss.item() / n, correct.item() / n, n / seconds


@torch.no_grad()
def test_accuracy(model, images, labels, batch_size):
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def saved_bytes(model, images, labels, batch_size):
    """Bytes autograd keeps for backward in one training step of one batch
    (the input batch itself not counted)."""
    model.train()
    x, y = images[:batch_size], labels[:batch_size]
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the step's statistics update is undone
    n = convbn.utils.saved_tensor_bytes(lambda: nn.functional.cross_entropy(model(x), y), exclude=[x])
    model.load_state_dict(state)
    return n


def plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"nn (unfused)": "-", "convbn (fused)": "--"}
    for name, rows in history.items():
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, [r["loss"] for r in rows], styles[name], marker="o", label=name)
        ax_acc.plot(epochs, [r["train_acc"] for r in rows], styles[name], marker="o", label=f"{name} train")
        ax_acc.plot(epochs, [r["test_acc"] for r in rows], styles[name], marker="s", label=f"{name} test")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("LeNet-BN on Fashion-MNIST: nn layers vs convbn.fuse")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(args, device, history, saved, n_train, n_test):
    ref, fused = history["nn (unfused)"], history["convbn (fused)"]
    lines = [
        "# convbn demo: LeNet-BN on Fashion-MNIST",
        "",
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, device {device_name(device)}, "
        f"{torch.get_num_threads()} CPU threads. {n_train} training and {n_test} test images, "
        f"batch {args.batch_size}, SGD lr {args.lr}, {args.epochs} epochs, seed {args.seed}; "
        "both models start from the same weights and see the same batches.",
        "",
        "| epoch | loss nn | loss convbn | train acc nn | train acc convbn | test acc nn | test acc convbn "
        "| examples/s nn | examples/s convbn |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r, f in zip(ref, fused):
        lines.append(
            f"| {r['epoch']} | {r['loss']:.4f} | {f['loss']:.4f} | {r['train_acc']:.4f} | {f['train_acc']:.4f} "
            f"| {r['test_acc']:.4f} | {f['test_acc']:.4f} | {r['examples_per_s']:.0f} | {f['examples_per_s']:.0f} |"
        )
    speed = [f["examples_per_s"] / r["examples_per_s"] for r, f in zip(ref, fused)]
    gap = 100 * (fused[-1]["test_acc"] - ref[-1]["test_acc"])
    lines += [
        "",
        f"- Final test accuracy: nn {ref[-1]['test_acc']:.4f}, convbn {fused[-1]['test_acc']:.4f} "
        f"({gap:+.2f} points; expected within 1). The book reports train {BOOK['train_acc']}, "
        f"test {BOOK['test_acc']} after 10 epochs.",
        f"- Training throughput, convbn / nn: {sorted(speed)[len(speed) // 2]:.2f}x "
        f"(median over epochs; range {min(speed):.2f}x to {max(speed):.2f}x).",
        f"- Bytes kept for backward per batch of {args.batch_size}: nn {saved['nn (unfused)']:,}, "
        f"convbn {saved['convbn (fused)']:,} "
        f"({saved['convbn (fused)'] / saved['nn (unfused)']:.2f}x).",
    ]
    return "\n".join(lines) + "\n", abs(gap)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        data_dir = fashion_mnist.ensure(args.data)
    except fashion_mnist.MissingData as missing:
        print(missing, file=sys.stderr)
        return 2
    train_x, train_y, test_x, test_y = fashion_mnist.load(data_dir)
    if args.limit:
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]
        test_x, test_y = test_x[:args.limit], test_y[:args.limit]
    train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))

    torch.manual_seed(args.seed)
    reference = convbn.models.lenet_bn().to(device)
    fused = convbn.fuse(reference)  # a copy: the same initial weights
    kinds = [type(m).__name__ for m in fused.modules() if isinstance(m, (convbn.ConvBN2d, convbn.LinearBN1d))]
    print(f"convbn.fuse: {kinds.count('ConvBN2d')} ConvBN2d and {kinds.count('LinearBN1d')} LinearBN1d "
          f"(from {len(train_x)} training images in {data_dir}, on {device_name(device)})")
    models = {"nn (unfused)": reference, "convbn (fused)": fused}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=args.lr) for name, m in models.items()}
    saved = {name: saved_bytes(m, train_x, train_y, args.batch_size) for name, m in models.items()}
    history = {name: [] for name in models}

    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed + epoch))
        order = order.to(device)
        for name, model in models.items():  # interleaved, so both see the same machine conditions
            loss, train_acc, speed = train_epoch(
                model, train_x, train_y, order, args.batch_size, optimizers[name], device,
                not args.no_progress, f"epoch {epoch}/{args.epochs} {name}")
            test_acc = test_accuracy(model, test_x, test_y, 1024)
            history[name].append(dict(epoch=epoch, loss=loss, train_acc=train_acc, test_acc=test_acc,
                                      examples_per_s=speed))
            print(f"epoch {epoch:2d} {name:15s} loss {loss:.4f}  train acc {train_acc:.4f}  "
                  f"test acc {test_acc:.4f}  {speed:,.0f} examples/s")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "fashion_mnist_lenet_bn.png")
    plot(history, png)
    text, gap = summary(args, device, history, saved, len(train_x), len(test_x))
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print()
    print(text)
    print(f"Wrote {png} and {os.path.join(args.out, 'summary.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
