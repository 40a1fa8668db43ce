"""Triton Python backend: CLIP captions (TYPE_STRING) -> token ids [context_length] and pool position.

Written by `mmfast.export.triton_server`; `mmfast_clip.json` beside this file holds the settings,
`tokenizer/` the Hugging Face tokenizer files when the checkpoint has them (else open_clip's ids).
Rows are padded to the full context length, so the dynamic batcher can batch any two requests;
the text tower is causal, so the padding does not change the pooled embedding.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mmfast.clip.tokenizer import ClipTokenizer


def pool_positions(ids: np.ndarray, pool: str, eos_token_id: int) -> np.ndarray:
    # ids: (N, T) -> (N,), as mmfast.clip.model.CLIP.pool_positions
    return ids.argmax(-1) if pool == "argmax" else (ids == eos_token_id).argmax(-1)


def _texts(request) -> list:
    raw = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)  # (b,) bytes
    return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        cfg = json.loads((here / "mmfast_clip.json").read_text(encoding="utf-8"))
        self.pool, self.eos = cfg["pool"], cfg["eos_token_id"]
        ctx = cfg["context_length"]
        tok = here / "tokenizer"
        self.tokenizer = ClipTokenizer.from_hf_dir(tok, ctx) if tok.is_dir() else ClipTokenizer.default(ctx)

    def execute(self, requests):
        texts, errors = [], {}
        for i, request in enumerate(requests):
            try:
                texts.append(_texts(request))
            except UnicodeDecodeError as e:
                errors[i] = f"text is not UTF-8 ({e.reason} at byte {e.start}); send UTF-8 encoded captions"
                texts.append([])
        flat = [t for rows in texts for t in rows]
        ids = self.tokenizer(flat).numpy() if flat else np.zeros((0, 1), np.int64)  # one Rust batch
        pool = pool_positions(ids, self.pool, self.eos)
        responses, start = [], 0
        for i, rows in enumerate(texts):
            end = start + len(rows)
            if i in errors:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(errors[i])))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("ids", ids[start:end]), pb_utils.Tensor("pool", pool[start:end, None])]))
            start = end
        return responses

    def finalize(self):
        self.tokenizer = None
