"""convbn demo: train the same small conv net twice, once with
nn.Conv2d + nn.BatchNorm2d and once converted with convbn.fuse, from the same
initial weights on the same batches, and compare losses, time and the memory
kept for backward.

The task is synthetic and needs no download: 32x32 noise images with one
brighter 8x8 square; the label is the square's position (one of 4
quadrants). (The Fashion-MNIST LeNet demo is planned as its own issue.)
"""

import argparse
import copy
import time

import torch
from torch import nn

import convbn


def make_batch(batch, generator):
    images = torch.randn(batch, 1, 32, 32, generator=generator) * 0.5
    labels = torch.randint(0, 4, (batch,), generator=generator)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        r0 = row * 16 + int(torch.randint(0, 8, (1,), generator=generator))
        c0 = col * 16 + int(torch.randint(0, 8, (1,), generator=generator))
        images[i, 0, r0:r0 + 8, c0:c0 + 8] += 1.5
    return images, labels


def make_net():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )


def train(model, steps, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    losses, elapsed = [], 0.0
    model.train()
    for _ in range(steps):
        images, labels = make_batch(batch, generator)
        start = time.perf_counter()
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        elapsed += time.perf_counter() - start
        losses.append(loss.item())
    model.eval()
    images, labels = make_batch(1024, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    return losses, elapsed, accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()

    torch.manual_seed(0)
    pair_net = make_net()
    fused_net = convbn.fuse(copy.deepcopy(pair_net))
    n_fused = sum(isinstance(m, convbn.ConvBN2d) for m in fused_net.modules())
    print(f"convbn.fuse replaced {n_fused} Conv2d+BatchNorm2d pairs with ConvBN2d")

    probe, _ = make_batch(args.batch, torch.Generator().manual_seed(123))
    memory = {name: convbn.utils.saved_tensor_bytes(lambda net=net: copy.deepcopy(net).train()(probe))
              for name, net in (("nn.Conv2d+nn.BatchNorm2d", pair_net), ("convbn.ConvBN2d", fused_net))}

    results = {}
    for name, net in (("nn.Conv2d+nn.BatchNorm2d", pair_net), ("convbn.ConvBN2d", fused_net)):
        results[name] = train(net, args.steps, args.batch, seed=7)

    base_losses, base_time, _ = results["nn.Conv2d+nn.BatchNorm2d"]
    print(f"\n{args.steps} SGD steps, batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads\n")
    print(f"{'model':<26}{'first loss':>11}{'last loss':>11}{'accuracy':>10}{'time':>9}{'vs pair':>9}"
          f"{'saved for backward':>22}{'vs pair':>9}")
    for name, (losses, elapsed, accuracy) in results.items():
        print(f"{name:<26}{losses[0]:>11.4f}{losses[-1]:>11.4f}{accuracy:>10.3f}{elapsed:>8.2f}s"
              f"{elapsed / base_time:>8.2f}x{memory[name] / 2**20:>18.2f} MiB"
              f"{memory[name] / memory['nn.Conv2d+nn.BatchNorm2d']:>8.2f}x")
    fused_losses = results["convbn.ConvBN2d"][0]
    drift = max(abs(a - b) for a, b in zip(base_losses, fused_losses))
    print(f"\nlargest difference between the two loss curves over {args.steps} steps: {drift:.2e}")


if __name__ == "__main__":
    main()
