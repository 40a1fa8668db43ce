"""Test-wide setup. Order matters: both lines below must run before anything imports the modules."""
import os

# Triton kernels run on CPU through the interpreter; it must be set before kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# torchvision's PyPI wheel does not load beside the CPU torch wheel ("operator torchvision::nms
# does not exist"); open_clip imports it for its transforms. Defining the two missing operator
# schemas lets it import. Test-only: mmfast itself never imports torchvision.
try:
    _tv = torch.library.Library("torchvision", "DEF")
    _tv.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _tv.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except RuntimeError:  # already defined (a real torchvision build that matches torch)
    pass

torch.manual_seed(0)
