"""CLIP tokenizer throughput: mmfast.ClipTokenizer vs open_clip.tokenize and transformers' CLIPTokenizer.

Captions are synthetic (no dataset ships offline): Zipf-distributed English words, ~10% of them with
a non-ASCII phrase (Cyrillic, CJK, accents, emoji); a second case is all non-ASCII, where ftfy (run
by both open_clip and mmfast) bounds the speed. Items are tokens (SOT/EOT included, padding not).
"""
from __future__ import annotations

import gzip
import json
import random
import tempfile
from pathlib import Path

from benchmarks.harness import Case, Provider

_WORDS = """a an the of on in with and at by near under over next to two three several small large young old
red blue green white black yellow brown wooden metal glass man woman child boy girl dog cat horse bird cow
sheep elephant giraffe zebra bear person people player group family car bus truck train bicycle airplane
boat street road field beach water ocean river lake mountain snow grass tree building house kitchen table
chair bed room window door plate bowl cup pizza sandwich cake banana apple laptop phone television book
clock umbrella kite frisbee skateboard surfboard sitting standing walking running riding holding eating
playing looking flying parked covered filled there is are while its their his her very some front top
side back middle view picture photo image photograph painting drawing watercolor portrait landscape city
night sunset colorful bright dark cloudy sunny busy empty tall short long round little big""".split()
_EXTRA = ["кошка на диване", "собака бежит по траве", "café au lait", "crème brûlée", "naïve façade", "東京の夜景",
          "一只猫坐在沙发上", "Ελληνικά γράμματα", "über straße", "🐶 dog", "niño pequeño", "São Paulo", "Zürich",
          "مرحبا بالعالم", "한국어 문장"]


def captions(n: int, non_ascii: float = 0.1, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** 0.9 for i in range(len(_WORDS))]
    out = []
    for _ in range(n):
        ws = rng.choices(_WORDS, weights, k=rng.randint(6, 18))
        if rng.random() < 0.3:
            ws[0] = ws[0].capitalize()
        if rng.random() < non_ascii:
            ws.insert(rng.randrange(len(ws)), rng.choice(_EXTRA))
        if rng.random() < 0.1:
            ws.insert(rng.randrange(len(ws)), str(rng.randint(1, 2024)))
        out.append(" ".join(ws) + rng.choice(["", "", ".", "!", " ..."]))
    return out


def _hf_dir() -> Path:
    import tests.torchvision_shim  # noqa: F401
    # vocab.json + merges.txt from open_clip's BPE file, as HF's conversion writes them.
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    d = Path(tempfile.mkdtemp(prefix="mmfast_clip_tok_"))
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (d / "vocab.json").write_text(json.dumps({rename.get(k, k): v for k, v in SimpleTokenizer().encoder.items()}))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return d


def cases(args):
    import tests.torchvision_shim  # noqa: F401 - lets open_clip import torchvision
    import open_clip
    from transformers import CLIPTokenizer

    from mmfast.clip.tokenizer import ClipTokenizer
    n = 1000 if args.quick else 10_000
    mm, oc = ClipTokenizer.default(), open_clip.tokenizer.SimpleTokenizer()
    d = _hf_dir()
    mm_hf, hf = ClipTokenizer.from_hf_dir(d), CLIPTokenizer.from_pretrained(d)

    def cold(tok, texts):
        tok._encode._cache = {}  # every word goes through Rust BPE again
        return tok(texts)

    for name, share in (("10% non-ASCII", 0.1), ("all non-ASCII", 1.0)):
        texts = captions(n, share)
        ids, ids_hf = oc(texts), mm_hf(texts)
        assert (mm(texts) == ids).all()
        tokens = float((ids != 0).sum())
        tokens_hf = float((ids_hf == mm_hf.eot_id).int().argmax(-1).sum() + len(texts))  # up to the first EOT
        yield Case("clip_tokenize open_clip ids", f"{n} captions, {name}", baseline="open_clip SimpleTokenizer",
                   items=tokens, providers=[
                       Provider("open_clip SimpleTokenizer", lambda: oc(texts)),
                       Provider("mmfast ClipTokenizer.default", lambda: mm(texts)),
                       Provider("mmfast ClipTokenizer.default, cold cache", lambda: cold(mm, texts))])
        yield Case("clip_tokenize HF ids", f"{n} captions, {name}", baseline="transformers CLIPTokenizer",
                   items=tokens_hf, providers=[
                       Provider("transformers CLIPTokenizer", lambda: hf(texts, padding="max_length", max_length=77,
                                                                           truncation=True, return_tensors="pt")),
                       Provider("mmfast ClipTokenizer.from_hf_dir", lambda: mm_hf(texts)),
                       Provider("mmfast ClipTokenizer.from_hf_dir, cold cache", lambda: cold(mm_hf, texts))])
