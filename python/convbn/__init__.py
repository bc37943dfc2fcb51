"""convbn: Conv2d followed by BatchNorm2d as one PyTorch operator.

    torch.ops.convbn.conv_bn_train / conv_bn_train_backward /
        update_running_stats / conv_bn_eval     the operators
    convbn.ConvBN2d                             the nn.Module
    convbn.functional.conv_bn                   the functional form
    convbn.fuse(model)                          convert a model's pairs
    convbn.utils.saved_tensor_bytes(fn)         bytes kept for backward
"""

from . import _library

_library.load()

from . import _fake  # noqa: E402,F401  (registers the fake kernels)
from . import functional, utils  # noqa: E402
from .fuse import fuse  # noqa: E402
from .modules import ConvBN2d  # noqa: E402

__all__ = ["ConvBN2d", "functional", "fuse", "utils"]
__version__ = "0.1.0"
