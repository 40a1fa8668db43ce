"""Triton Python backend: prompts (TYPE_STRING) -> DALL·E image tokens [256] (+ images when a VQGAN is
attached), running mmfast's own generation loop (static KV cache, once-per-prompt cross K/V).

Written by `mmfast.export.triton_server`; the min-dalle files are in `dalle/` beside this file and
`mmfast_dalle.json` holds the settings. Optional inputs per request: seed (default: random),
top_k, top_p, temperature, guidance. Requests with the same sampling settings are decoded together;
an image's tokens depend only on its prompt and seed, so batching never changes a result.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

import mmfast

DEFAULTS = {"top_k": 256, "top_p": 1.0, "temperature": 1.0, "guidance": 16.0}


def _column(request, name, rows, default, cast):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return [default] * rows
    values = t.as_numpy().reshape(-1)
    if values.shape[0] != rows:
        raise ValueError(f"{name} has {values.shape[0]} values for {rows} prompts; send one per prompt")
    return [cast(v) for v in values]


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        cfg = json.loads((here / "mmfast_dalle.json").read_text(encoding="utf-8"))
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu"
        self.gen = mmfast.load_generator(here / "dalle", device=device, dtype=cfg.get("dtype", "auto"))
        self.rng = np.random.default_rng()

    def _rows(self, request):
        raw = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy().reshape(-1)  # (b,) bytes
        prompts = [p.decode("utf-8") for p in raw]
        n = len(prompts)
        seeds = _column(request, "seed", n, None, int)
        seeds = [int(self.rng.integers(0, 2 ** 62)) if s is None else s for s in seeds]
        if any(not 0 <= s < 2 ** 63 for s in seeds):  # checked here: a bad seed fails its own request only
            raise ValueError(f"seed must be in [0, 2**63), got {seeds}")
        params = zip(*(_column(request, k, n, v, type(v)) for k, v in DEFAULTS.items()))
        return [(p, s, tuple(ps)) for p, s, ps in zip(prompts, seeds, params)]

    def execute(self, requests):
        rows, errors = [], {}
        for i, request in enumerate(requests):
            try:
                rows.append(self._rows(request))
            except (ValueError, UnicodeDecodeError) as e:
                errors[i] = str(e)
                rows.append([])
        groups = {}  # sampling settings -> [(request, row, prompt, seed)]
        for i, rs in enumerate(rows):
            for j, (prompt, seed, params) in enumerate(rs):
                groups.setdefault(params, []).append((i, j, prompt, seed))
        tokens = {}
        for params, items in groups.items():
            try:
                out = self.gen.generate_tokens([it[2] for it in items], n=1, seed=[it[3] for it in items],
                                               **dict(zip(DEFAULTS, params)))
            except (ValueError, TypeError) as e:
                for it in items:
                    errors[it[0]] = str(e)
                continue
            for it, t in zip(items, out.numpy()):
                tokens[it[:2]] = t
        responses = []
        for i, rs in enumerate(rows):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(errors[i])))
                continue
            t = np.stack([tokens[(i, j)] for j in range(len(rs))])  # (b, 256) int64
            outputs = [pb_utils.Tensor("tokens", t)]
            if self.gen.vq is not None:
                outputs.append(pb_utils.Tensor("image", self.gen.vq.decode(t).numpy()))  # (b, H, W, 3) uint8
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def finalize(self):
        self.gen = None
