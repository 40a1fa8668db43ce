"""tools/train_demo.py runs end to end (a few steps per stage) and writes files the loaders read."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mmfast

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "train_demo.py"), "--smoke", "--out", str(tmp_path),
                        "--threads", "1"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "MMFAST_BACKEND": "torch"})
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["smoke"] and set(metrics["train_seconds"]) == {"clip_s", "vq_s", "generator_s", "total_s"}
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"clip", "vq", "generator"}
    gen = mmfast.load_generator(tmp_path / "generator", device="cpu", dtype="fp32", backend="torch")
    assert gen.vq is not None and gen.generate_tokens("a red star", n=1, seed=0, top_k=4).shape == (1, 16)
