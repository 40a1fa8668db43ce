"""The demo models' tokenizers, learned on `mmfast.demo.data`'s captions in both languages and
written in each family's own files, so the ordinary loaders (and transformers / min-dalle's
formats) read them: CLIP's byte-level BPE (vocab.json, merges.txt, tokenizer_config.json) and
a BART-style BPE for the generator. Used by tools/train_demo.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mmfast.clip.tokenizer import ClipTokenizer  # noqa: E402
from mmfast.dalle.tokenizer import DalleTokenizer  # noqa: E402
from mmfast.demo import data  # noqa: E402

_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"
CLIP_CONTEXT = 32


def build_clip_tokenizer(out: Path) -> ClipTokenizer:
    """A byte-level BPE in CLIP's format (`</w>` word ends, the same pre-tokenizer as transformers'
    CLIPTokenizer), its merges learned on both languages' captions until every word is one token."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    from mmfast.clip.tokenizer import _HF_SPLIT, _bytes_to_unicode

    tok = Tokenizer(BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_HF_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = BpeTrainer(vocab_size=4000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(data.corpus("en") + data.corpus("ru"), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    chars = _bytes_to_unicode()  # CLIP's order: bytes, bytes + </w>, merges, then the two specials
    tokens = chars + [c + "</w>" for c in chars]
    tokens += [t for t in dict.fromkeys("".join(m) for m in merges) if t not in set(tokens)]
    vocab = {t: i for i, t in enumerate(tokens + [_SOT, _EOT])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_CONTEXT, "bos_token": _SOT,
        "eos_token": _EOT, "pad_token": _EOT, "unk_token": _EOT, "do_lower_case": True}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": _SOT, "eos_token": _EOT, "pad_token": _EOT, "unk_token": _EOT}, indent=1))
    tokenizer = ClipTokenizer.from_hf_dir(out)
    ids = tokenizer(data.corpus("en")[:500] + data.corpus("ru")[:500])
    body = ids[:, 1:][ids[:, 1:] != tokenizer.eot_id]
    assert (ids == tokenizer.eot_id).any(1).all() and not (body == tokenizer.sot_id).any(), "caption overflow"
    return tokenizer


_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")   # BART's ids 0..3; <pad> = 1 is min-dalle's text padding
GEN_TEXT_TOKENS = 24


def build_dalle_tokenizer(out: Path) -> DalleTokenizer:
    """A BART-style BPE (words prefixed by "Ġ", raw characters, no byte mapping) learned on the
    captions of both languages until every word is one token. min-dalle's own cleaning keeps ASCII
    only, so the folder's config.json says `"text_cleaning": "unicode"` (NFC, lower-case, Cyrillic
    kept) and the loader builds the tokenizer with that cleaning."""
    import string

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    from mmfast.dalle.tokenizer import clean_unicode

    space = chr(ord(" ") + 256)
    tok = Tokenizer(BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cyrillic = [chr(c) for c in range(ord("а"), ord("я") + 1)] + ["ё"]
    alphabet = sorted(set(string.ascii_lowercase + string.digits + string.punctuation) | set(cyrillic)) + [space]
    trainer = BpeTrainer(vocab_size=3000, min_frequency=1, show_progress=False, special_tokens=list(_SPECIALS),
                         initial_alphabet=alphabet)
    corpus = [clean_unicode(t) for t in data.corpus("en") + data.corpus("ru")]
    tok.train_from_iterator([" ".join(space + w for w in t.split(" ") if w) for t in corpus], trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    tokenizer = DalleTokenizer.from_files(out / "vocab.json", out / "merges.txt", text_tokens=GEN_TEXT_TOKENS,
                                          cleaning="unicode")
    words = {w for t in corpus for w in t.split(" ") if w}
    split = sorted(w for w in words if len(tokenizer.tokenize(w)) != 3)
    assert not split, f"words not learned as one token: {split[:10]}"
    longest = max(len(tokenizer.tokenize(t)) for t in corpus)
    assert longest <= GEN_TEXT_TOKENS, f"a caption needs {longest} > {GEN_TEXT_TOKENS} text tokens"
    return tokenizer
