"""convbn: Conv2d followed by BatchNorm2d, and Linear followed by
BatchNorm1d, each as one PyTorch operator.

    torch.ops.convbn.conv_bn_train / conv_bn_train_backward / conv_bn_eval
    torch.ops.convbn.linear_bn_train / linear_bn_train_backward / linear_bn_eval
    torch.ops.convbn.update_running_stats / fold_conv_bn
                                                the operators
    torch.ops.convbn.sync_conv_bn_train / sync_linear_bn_train (+ backwards)
                                                the same over a process group
    convbn.ConvBN1d/2d/3d, convbn.ConvTransposeBN1d/2d/3d, convbn.LinearBN1d
                                                the nn.Modules (the conv ones with
                                                an optional fused activation)
    convbn.SyncConvBN2d, convbn.SyncLinearBN1d  statistics over all processes
    convbn.convert_sync_batchnorm(model)        ConvBN2d/LinearBN1d -> Sync*
    convbn.functional.conv_bn / linear_bn       the functional forms
    convbn.fuse(model), convbn.unfuse(model)    convert a model's pairs in place
    convbn.FusedBatchNormSlot, convbn.FusedActivationSlot, convbn.FuseReport
                                                what fuse leaves and reports
    convbn.recalibrate(model, batches)          exact population statistics
    convbn.models                               ResNet-18/50 and d2l's LeNet-BN
    convbn.utils.saved_tensor_bytes(fn)         bytes kept for backward
    convbn.build_info(), convbn.__version__     what this build was compiled with
    convbn.onnx_translation_table()             custom_translation_table for torch.onnx.export of an ExportedProgram
"""

from . import _library

_library.load()  # after checking the build's torch against the running one

from . import _fake  # noqa: E402,F401  (registers the fake kernels)
from . import _onnx  # noqa: E402,F401  (registers the TorchScript-based ONNX exporter's symbolics)
from ._onnx import onnx_translation_table  # noqa: E402
from . import functional, models, utils  # noqa: E402
from .distributed import (  # noqa: E402
    SyncConvBN1d, SyncConvBN2d, SyncConvBN3d, SyncConvTransposeBN1d, SyncConvTransposeBN2d, SyncConvTransposeBN3d,
    SyncLinearBN1d, convert_sync_batchnorm,
)
from .fuse import FusedActivationSlot, FusedBatchNormSlot, FuseReport, fuse, unfuse  # noqa: E402
from .modules import (  # noqa: E402
    ConvBN1d, ConvBN2d, ConvBN3d, ConvTransposeBN1d, ConvTransposeBN2d, ConvTransposeBN3d, LinearBN1d,
)
from .recalibrate import recalibrate  # noqa: E402
from ._library import build_info  # noqa: E402

__all__ = [
    "ConvBN1d", "ConvBN2d", "ConvBN3d", "ConvTransposeBN1d", "ConvTransposeBN2d", "ConvTransposeBN3d", "build_info", "FuseReport", "FusedActivationSlot", "FusedBatchNormSlot", "LinearBN1d", "SyncConvBN1d", "SyncConvBN2d", "SyncConvBN3d", "SyncConvTransposeBN1d",
    "SyncConvTransposeBN2d", "SyncConvTransposeBN3d", "SyncLinearBN1d", "convert_sync_batchnorm", "functional",
    "fuse", "models", "onnx_translation_table", "recalibrate", "unfuse", "utils",
]
__version__ = "0.1.0"
