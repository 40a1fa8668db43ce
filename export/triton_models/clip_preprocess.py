"""Triton Python backend: encoded images (TYPE_STRING: JPEG / PNG / ... bytes) -> CLIP pixels [3, S, S].

Written by `mmfast.export.triton_server`; `mmfast_clip.json` beside this file holds the checkpoint's
own preprocessing (`mmfast.preprocess.ImagePreprocessor` fields): resize, crop, normalize.
"""
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from mmfast.preprocess import ImagePreprocessor


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        cfg = json.loads((here / "mmfast_clip.json").read_text(encoding="utf-8"))
        self.preprocess = ImagePreprocessor(**cfg["preprocess"])

    def execute(self, requests):
        responses = []
        for request in requests:  # decode + resize run in mmfast's thread pool, per request batch
            images = [bytes(b) for b in pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)]
            try:
                pixels = self.preprocess(images).numpy()
            except Exception as e:  # noqa: BLE001 - a bad image fails its own request only
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"image could not be decoded: {e}")))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("pixels", pixels)]))
        return responses

    def finalize(self):
        self.preprocess = None
