"""The README's first command, examples/demo.py: its Fashion-MNIST reader
(IDX files) and an end-to-end run on a small synthetic data set written in
that format (the real run is recorded in benchmarks/RESULTS.md)."""

import gzip
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import fashion_mnist  # noqa: E402


def write_dataset(folder, n_train=600, n_test=300, seed=0):
    """Images whose class is readable from them (a bright band whose row is
    the label), so one epoch already learns something."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 80, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 250
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    for key, name in fashion_mnist.FILES.items():
        fashion_mnist.write_idx(os.path.join(folder, name), arrays[key])
    return arrays


def test_idx_reader_round_trip_and_errors(tmp_path):
    arrays = write_dataset(str(tmp_path), 40, 20)
    train_x, train_y, test_x, test_y = fashion_mnist.load(str(tmp_path))
    assert train_x.shape == (40, 1, 28, 28) and test_x.shape == (20, 1, 28, 28)
    assert str(train_x.dtype) == "torch.float32" and str(train_y.dtype) == "torch.int64"
    np.testing.assert_array_equal(train_x[:, 0].numpy(), arrays["train_images"] / np.float32(255))
    np.testing.assert_array_equal(test_y.numpy(), arrays["test_labels"])

    bad = tmp_path / "bad.gz"
    fashion_mnist.write_idx(str(bad), np.zeros((3, 2), np.uint8))
    data = bytearray(gzip.open(bad).read())
    data[2] = 0x0D  # float32, not unsigned bytes
    with gzip.open(bad, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        fashion_mnist.read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match=r"header says \(5,\)"):
        fashion_mnist.read_idx(str(short))


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_DIR), reason="dataset-fashion-mnist is not installed")
def test_debian_package_has_the_real_data():
    train_x, train_y, test_x, test_y = fashion_mnist.load(fashion_mnist.DEBIAN_DIR)
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert sorted(train_y.unique().tolist()) == list(range(10))
    assert 0 <= float(train_x.min()) and float(train_x.max()) <= 1


def run_demo(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_demo_end_to_end_on_small_data(tmp_path):
    write_dataset(str(tmp_path))
    out = tmp_path / "out"
    result = run_demo("--data", str(tmp_path), "--epochs", "2", "--device", "cpu", "--out", str(out),
                      "--batch-size", "64", "--lr", "0.5")
    assert result.returncode == 0, result.stderr
    assert "2 ConvBN2d and 2 LinearBN1d" in result.stdout
    summary = (out / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 2
    for row in rows:
        cells = [float(c) for c in row.strip("|").split("|")]
        loss_nn, loss_fused, *accuracies = cells[1:7]
        assert loss_nn > 0 and abs(loss_fused - loss_nn) < 0.05 * loss_nn
        assert all(0 <= a <= 1 for a in accuracies)
    test_acc_nn, test_acc_fused = (float(c) for c in rows[-1].strip("|").split("|")[5:7])
    assert test_acc_nn > 0.5 and abs(test_acc_fused - test_acc_nn) <= 0.05  # the bands are easy to learn
    saved = re.search(r"nn ([\d,]+), convbn ([\d,]+)", summary)
    assert int(saved[2].replace(",", "")) < int(saved[1].replace(",", ""))
    png = (out / "fashion_mnist_lenet_bn.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_says_how_to_get_missing_data(tmp_path):
    result = run_demo("--data", str(tmp_path / "nowhere"), "--epochs", "1")
    assert result.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert "--data" in result.stderr and "github.com/zalandoresearch/fashion-mnist" in result.stderr
