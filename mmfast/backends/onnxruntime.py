"""CLIP towers on ONNX Runtime: the duck type of `mmfast.clip.model.CLIP` that `Clip` calls."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mmfast.export.onnx import export_clip, ort_sessions


class OrtClip:
    """Exports an fp32 CLIP once (to `cache_dir`, default a temp dir) and runs it with ORT.

    `int8=True` then rewrites both graphs with ORT's dynamic quantization (int8 per-channel
    weights, activations quantized per call: MatMulInteger on MLAS's VNNI kernels).
    """

    def __init__(self, model, cache_dir=None, int8: bool = False):
        self.cfg = model.cfg
        self._pool = model.pool_positions
        self.logit_scale = model.logit_scale
        out = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="mmfast-onnx-"))
        self.paths = export_clip(model, out)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic
            for k, p in list(self.paths.items()):
                q = p.with_name(p.stem + "_int8.onnx")
                quantize_dynamic(str(p), str(q), weight_type=QuantType.QInt8, per_channel=True)
                self.paths[k] = q
        self.sessions = ort_sessions(self.paths)

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        return self._pool(ids)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float().contiguous().cpu().numpy()
        return torch.from_numpy(self.sessions["image"].run(None, {"pixels": x})[0])

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        pool = self.pool_positions(ids)
        T = int(pool.max()) + 1 if ids.shape[0] else 1  # same exact truncation as the torch model
        feeds = {"ids": ids[:, :T].contiguous().cpu().numpy(), "pool": pool.cpu().numpy()}
        return torch.from_numpy(self.sessions["text"].run(None, feeds)[0])
