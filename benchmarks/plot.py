"""The README's chart: mmfast's default against each peer, per workload, from benchmarks/results/.

`python -m benchmarks.plot [--out benchmarks/results/chart-cpu.png]` reads the newest run of every
row it names below (the rows are measured by `python -m benchmarks.run <suite>`), and draws one
horizontal bar per (workload, peer): the peer's p50 time over mmfast's, so 4× means mmfast takes a
quarter of the time. Each bar is labelled with the CPU its run was measured on: the suites were
run on different machines, and a ratio is only meaningful within one run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# (workload label, results file, op, shape (exact; a trailing * matches a prefix), mmfast provider, [peers])
WORKLOADS = [
    ("CLIP ViT-B/32 images, batch 32", "clip", "clip.encode_images", "ViT-B-32 B=32", "mmfast auto (int8)",
     ["open_clip eager fp32", "onnxruntime fp32"]),
    ("CLIP ViT-B/32 images, batch 1", "clip", "clip.encode_images", "ViT-B-32 B=1", "mmfast auto (int8)",
     ["open_clip eager fp32", "onnxruntime fp32"]),
    ("CLIP ViT-B/32 texts, batch 32", "clip", "clip.encode_texts", "ViT-B-32 B=32*", "mmfast auto (int8)",
     ["open_clip eager fp32"]),
    ("Similarity top-10, 1M x 512, 16 queries", "similarity", "similarity_topk", "Q=16 N=1000000 D=512 k=10", "mmfast fp16",
     ["torch matmul+topk", "faiss IndexFlatIP"]),
    ("Nearest code, M=16384 K=16384 D=256", "codebook", "nearest_code", "M=16384 K=16384 D=256", "mmfast fp32",
     ["taming formula", "faiss IndexFlatL2 k=1"]),
    ("VQGAN f16 decode 256 px, batch 1", "vqgan", "vqgan.decode", "f16-16384 B=1 256x256", "mmfast bf16 (default)",
     ["taming Decoder fp32", "min-dalle VQGanDetokenizer fp32"]),
    ("VQGAN f16 decode 256 px, batch 4", "vqgan", "vqgan.decode", "f16-16384 B=4 256x256", "mmfast bf16 (default)",
     ["taming Decoder fp32", "min-dalle VQGanDetokenizer fp32"]),
    ("DALL·E mini, 256 tokens, 1 image", "dalle", "dalle.generate_tokens", "dalle-mini n=1 256 tokens", "mmfast fp32 (auto)",
     ["min-dalle loop (fp32)"]),
    ("DALL·E mini, 256 tokens, 4 images", "dalle", "dalle.generate_tokens", "dalle-mini n=4 256 tokens", "mmfast fp32 (auto)",
     ["min-dalle loop (fp32)"]),
]


def _cpu(row: dict) -> str:
    m = row.get("machine", {})
    name = m.get("host_cpu", "?")
    if "Xeon" in name:
        return "Xeon Ice Lake" if "106" in json.dumps(m) or "Ice" in name or "2.80GHz" in name else "Xeon"
    return "EPYC Zen 5" if "family 26" in name else name


def newest(suite: str, tag: str = "cpu") -> list[dict]:
    """Rows of the newest run of each (op, shape, provider) in `<suite>-<tag>.jsonl`."""
    path = RESULTS / f"{suite}-{tag}.jsonl"
    if not path.exists():
        return []
    best: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        k = (r["op"], r["shape"], r["provider"])
        if k not in best or r["time"] >= best[k]["time"]:
            best[k] = r
    return list(best.values())


def bars(tag: str = "cpu") -> list[tuple[str, str, float, str]]:
    """(workload, peer, speed-up of mmfast over the peer, CPU) for every row found."""
    out = []
    for label, suite, op, shape, ours, peers in WORKLOADS:
        rows = [r for r in newest(suite, tag) if r["op"] == op and (r["shape"] == shape or (
            shape.endswith("*") and r["shape"].startswith(shape[:-1])))]
        by = {r["provider"]: r for r in rows}
        if ours not in by:
            continue
        for peer in peers:
            if peer in by and by[peer]["time"][:13] == by[ours]["time"][:13]:    # the same run only
                out.append((label, peer, by[peer]["p50_ms"] / by[ours]["p50_ms"], _cpu(by[ours])))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=str(RESULTS / "chart-cpu.png"))
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = bars(args.tag)
    if not data:
        raise SystemExit("no rows found: run `python -m benchmarks.run <suite>` first")
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(data) + 1.4))
    names = [f"{w}\nvs {p} [{cpu}]" for w, p, _, cpu in data]
    vals = [v for _, _, v, _ in data]
    y = range(len(data))[::-1]
    ax.barh(list(y), vals, color=["#2b7bba" if v >= 1 else "#c0392b" for v in vals])
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v:.1f}×", va="center", fontsize=8)
    ax.set_yticks(list(y), names, fontsize=7)
    ax.axvline(1, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up of mmfast's default mode over the peer (peer p50 / mmfast p50, same run; log scale)")
    ax.set_title("mmfast vs peers on 2-vCPU CPUs (CPU of each run in brackets)", fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    fig.savefig(out, dpi=110)
    for w, p, v, cpu in data:
        print(f"{w:<42} vs {p:<36} {v:6.2f}x  [{cpu}]")
    print("wrote", out)


if __name__ == "__main__":
    main()
