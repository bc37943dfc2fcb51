"""Fashion-MNIST from its IDX files, as Debian's dataset-fashion-mnist
package installs them (/usr/share/datasets/fashion-mnist), or from any
folder holding the four files of https://github.com/zalandoresearch/fashion-mnist."""

import gzip
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_UBYTE = 0x08


class MissingData(Exception):
    pass


def how_to_get(data_dir: str) -> str:
    return (
        f"Fashion-MNIST was not found in {data_dir} (it needs {', '.join(FILES.values())}).\n"
        f"  On Debian/Ubuntu: sudo apt-get install {DEBIAN_PACKAGE}   (installs them in {DEBIAN_DIR})\n"
        "  Elsewhere: download the four files from "
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a folder and pass --data FOLDER"
    )


def _present(data_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(data_dir, name)) for name in FILES.values())


def ensure(data_dir: str = DEBIAN_DIR) -> str:
    """data_dir, once it holds the four files. For the Debian folder, installs
    the package when it is missing and this process can (root, apt-get);
    otherwise raises MissingData saying how to get the files."""
    if _present(data_dir):
        return data_dir
    can_install = (os.path.abspath(data_dir) == DEBIAN_DIR and shutil.which("apt-get")
                   and hasattr(os, "geteuid") and os.geteuid() == 0)
    if can_install:
        print(f"Fashion-MNIST: installing the Debian package {DEBIAN_PACKAGE} ...", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-qq", DEBIAN_PACKAGE]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
        if _present(data_dir):
            return data_dir
    raise MissingData(how_to_get(data_dir))


def read_idx(path: str) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed or not) as a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but it holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes a uint8 array as a gzip-compressed IDX file (for tests)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def load(data_dir: str):
    """(train_images, train_labels, test_images, test_labels): images as
    float32 (N, 1, 28, 28) in [0, 1] (d2l's ToTensor), labels as int64."""
    arrays = {key: read_idx(os.path.join(data_dir, name)) for key, name in FILES.items()}

    def images(a):
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a):
        return torch.from_numpy(a.astype(np.int64))

    return (images(arrays["train_images"]), labels(arrays["train_labels"]),
            images(arrays["test_images"]), labels(arrays["test_labels"]))
