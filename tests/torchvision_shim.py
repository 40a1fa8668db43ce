"""Let open_clip import torchvision beside the CPU torch wheel (test and benchmark use only).

torchvision's PyPI wheel does not load beside the CPU torch wheel ("operator torchvision::nms
does not exist"); open_clip imports it for its transforms. Defining the two missing operator
schemas is enough for it to import. mmfast itself never imports torchvision.
"""
import torch

try:
    _tv = torch.library.Library("torchvision", "DEF")
    _tv.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _tv.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except RuntimeError:  # already defined (a torchvision build that matches torch)
    pass
