"""ClipTokenizer against its two references: open_clip.tokenize (default) and transformers' CLIPTokenizer
(from_hf_dir), id for id, on tricky and random Unicode; plus bad input and concurrent calls."""
import gzip
import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mmfast.clip.tokenizer import ClipTokenizer, _open_clip_words

TRICKY = [
    "", " ", "   \t\n  ", "a photo of a cat", "A PHOTO OF A CAT.", "!!!???...", "--==++**", "a...b,,,c!!",
    "&amp;", "fish &amp; chips", "&lt;3", "&amp;lt;", "&#39;quoted&#39;", "&nbsp;x", "&notanentity;", "AT&T", "<b>bold</b> &amp;",
    "ＡＢＣ", "ｆｕｌｌ　ｗｉｄｔｈ", "ﬁne ﬂour", "ǅungla", "it’s “quoted”", "cafÃ©", "â€œmojibakeâ€\x9d", "SÃ£o Paulo",
    "кошка на диване", "КОШКА", "Ελληνικά γράμματα", "ΟΔΟΣ ΣΑ", "東京の夜景", "一只猫坐在沙发上", "한국어 문장", "مرحبا بالعالم",
    "שלום", "हिन्दी", "ไทย", "👍", "👩‍👩‍👧‍👦 family", "👍🏽👋🏿", "🏳️‍🌈", "❤️", "e\u0301", "é", "n\u0303a\u0308o\u0327",
    "12345", "3.14159", "١٢٣", "Ⅻ ½ ²", "don't we'll they're I'M YOU'VE she'd it's", "'s 't 're", "''quoted''",
    "https://example.com/a?b=c&d=e#frag", "user@example.com", "C:\\path\\to\\file.txt", "tab\there", "line\nbreak",
    "cr\r\nlf", "\x00\x01\x1b[31mred\x1b[0m", "a\x1cb", "a\x85b", "a\u200bb", "a\u00a0b", "a\u3000b", "\ufeffbom",
    "<|endoftext|>", "<|startoftext|> x <|endoftext|>", "<|ENDOFTEXT|>", "<end_of_text>", "<start_of_text>a",
    "!!<end_of_text>", "a<end_of_text>b", "</w>", "'ſ", "x\u0345y", "x\U00010940y", "\ufffd", "a\ud800b",
    " ".join(["word"] * 500), " ".join(f"w{i}" for i in range(500)), "😀" * 100, "超长" * 200,
]


def _random_texts(n: int, seed: int, ascii_only: bool = False) -> list[str]:
    rng = random.Random(seed)
    ranges = [(0x20, 0x7e)] if ascii_only else [
        (0x0, 0x7f), (0x80, 0x24f), (0x300, 0x36f), (0x370, 0x4ff), (0x590, 0x6ff), (0x900, 0x97f), (0x1e00, 0x1fff),
        (0x2000, 0x2bff), (0x3000, 0x30ff), (0x4e00, 0x9fff), (0xac00, 0xd7a3), (0xfb00, 0xfb4f), (0xff00, 0xffef),
        (0x1f300, 0x1faff), (0x10000, 0x10ffff)]
    frags = ["&amp;", "&lt;", "&#39;", "Ã©", "â€™", "<end_of_text>", "<|endoftext|>", "<|ENDOFTEXT|>", "'s", "'LL", " ",
             "  ", "cat", "Photo", "DOG", "7", "!?", "'", "<|", "|>", "</w>"]
    if not ascii_only:
        frags += ["\u200d", "\ufe0f", "🏽", "\t", "\n", "\r\n", "ſ", "Σ", "ﬁ", "\x85", "\x1c", "\u00a0"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.4:
                parts.append(rng.choice(frags))
            else:
                lo, hi = rng.choice(ranges)
                c = rng.randint(lo, hi)
                parts.append(chr(c if not 0xD800 <= c < 0xE000 else 0x41) * rng.choice([1, 1, 2]))
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer.default()


@pytest.fixture(scope="module")
def open_clip_tok():
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


def _write_hub_dir(d: Path) -> Path:
    """vocab.json + merges.txt made from the BPE file the way HF's conversion does, plus the hub's
    tokenizer_config.json / special_tokens_map.json of openai/clip-vit-base-patch32."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    d.mkdir(parents=True, exist_ok=True)
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in SimpleTokenizer().encoder.items()}
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    special = {"49406": {"content": "<|startoftext|>", **flags, "special": True},
               "49407": {"content": "<|endoftext|>", **flags, "special": True}}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": special, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 77,
        "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))
    (d / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|startoftext|>", **flags}, "eos_token": {"content": "<|endoftext|>", **flags},
        "pad_token": "<|endoftext|>", "unk_token": {"content": "<|endoftext|>", **flags}}))
    return d


@pytest.fixture(scope="module", params=["hub", "saved", "bare"])
def hf_pair(request, tmp_path_factory):
    """(mmfast, transformers) tokenizers on one HF folder: the hub's layout, transformers 5's own
    save_pretrained (tokenizer.json, flags normalized=False), and vocab.json + merges.txt alone."""
    from transformers import CLIPTokenizer
    hub = _write_hub_dir(tmp_path_factory.mktemp("hub"))
    if request.param == "hub":
        d = hub
    elif request.param == "saved":
        d = tmp_path_factory.mktemp("saved")
        CLIPTokenizer(vocab=str(hub / "vocab.json"), merges=str(hub / "merges.txt")).save_pretrained(d)
        assert not (d / "vocab.json").exists()  # transformers 5 writes tokenizer.json only
    else:
        d = tmp_path_factory.mktemp("bare")
        for f in ("vocab.json", "merges.txt"):
            (d / f).write_bytes((hub / f).read_bytes())
    return ClipTokenizer.from_hf_dir(d), CLIPTokenizer.from_pretrained(d)


def _hf_ref(ref, texts, length=77):
    return ref(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"]


def _assert_rows_equal(got, want, texts):
    assert got.dtype == torch.int64 and got.shape == want.shape
    bad = [i for i in range(len(texts)) if not torch.equal(got[i], want[i])]
    assert not bad, f"{len(bad)} rows differ, first {texts[bad[0]]!r}: {got[bad[0]].tolist()} vs {want[bad[0]].tolist()}"


# ---- open_clip mode ----------------------------------------------------------------------------

def test_open_clip_ids_tricky(tok, open_clip_tok):
    _assert_rows_equal(tok(TRICKY), open_clip_tok(TRICKY), TRICKY)
    for t in TRICKY[::7]:  # one text alone, and a str instead of a list
        _assert_rows_equal(tok(t), open_clip_tok(t), [t])


@pytest.mark.parametrize("seed", [0, 1])
def test_open_clip_ids_random_unicode(tok, open_clip_tok, seed):
    texts = _random_texts(300, seed)
    _assert_rows_equal(tok(texts), open_clip_tok(texts), texts)


@pytest.mark.parametrize("length", [2, 5, 16, 77, 100])
def test_open_clip_context_length(tok, open_clip_tok, length):
    _assert_rows_equal(tok(TRICKY, context_length=length), open_clip_tok(TRICKY, context_length=length), TRICKY)
    assert ClipTokenizer.default(context_length=length)(TRICKY).shape == (len(TRICKY), length)


def test_truncation_keeps_eot_last(tok):
    ids = tok(" ".join(["a long caption"] * 200))
    assert ids.shape == (1, 77) and ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
    assert (ids[0, 1:-1] != 0).all()


def test_properties_and_empty_batch(tok):
    assert (tok.sot_id, tok.eot_id, tok.pad_id, tok.vocab_size, tok.context_length) == (49406, 49407, 0, 49408, 77)
    assert tok([]).shape == (0, 77) and tok([]).dtype == torch.int64
    assert tok([""]).tolist()[0][:3] == [49406, 49407, 0]


def test_ascii_fast_path_equals_ftfy_cleaning():
    # Printable ASCII without "&" skips ftfy / html.unescape: prove it changes nothing.
    from open_clip.tokenizer import _clean_lower
    texts = [t.replace("&", "") for t in _random_texts(2000, 7, ascii_only=True)]
    assert all(" ".join(_open_clip_words(t)) == _clean_lower(t) for t in texts)


def test_shipped_vocab_is_open_clips():
    from open_clip.tokenizer import default_bpe
    import mmfast.clip.tokenizer as m
    assert m._DEFAULT_BPE.read_bytes() == Path(default_bpe()).read_bytes()


def test_mmfast_imports_neither_reference():
    code = "import sys, mmfast.clip.tokenizer; assert not {'open_clip', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- transformers mode -------------------------------------------------------------------------

def test_hf_ids_tricky(hf_pair):
    tok, ref = hf_pair
    texts = [t for t in TRICKY if "\ud800" not in t]  # transformers cannot take a lone surrogate
    _assert_rows_equal(tok(texts), _hf_ref(ref, texts), texts)
    assert (tok.sot_id, tok.eot_id, tok.pad_id, tok.vocab_size, tok.context_length) == (49406, 49407, 49407, 49408, 77)


@pytest.mark.parametrize("seed,ascii_only", [(0, False), (1, True)])
def test_hf_ids_random(hf_pair, seed, ascii_only):
    tok, ref = hf_pair
    texts = _random_texts(300, seed, ascii_only)
    _assert_rows_equal(tok(texts), _hf_ref(ref, texts), texts)
    _assert_rows_equal(tok(texts, context_length=9), _hf_ref(ref, texts, 9), texts)


def test_hf_lone_surrogate_is_a_clear_error(hf_pair):
    with pytest.raises(ValueError, match="invalid Unicode"):
        hf_pair[0](["fine", "a\ud800b"])


# Each line of the module docstring's list: the two references differ, and each mode follows its own.
DISAGREE = ["&amp;", "&lt;3", "ＡＢＣ", "ﬁ", "ǅ", "it’s", "cafÃ©", "a\x1cb", "a\x85b", "<end_of_text>",
            "<|endoftext|>", "ΟΔΟΣ", "'ſ", "x\u0345y"]


def test_references_disagree_where_documented(tok, open_clip_tok, hf_pair):
    hf, ref = hf_pair
    want_oc, want_hf = open_clip_tok(DISAGREE), _hf_ref(ref, DISAGREE)
    _assert_rows_equal(tok(DISAGREE), want_oc, DISAGREE)
    _assert_rows_equal(hf(DISAGREE), want_hf, DISAGREE)
    pad_to_zero = torch.where(torch.arange(77) > (want_hf == 49407).int().argmax(-1, keepdim=True), 0, want_hf)
    same = [t for i, t in enumerate(DISAGREE) if torch.equal(want_oc[i], pad_to_zero[i])]
    assert not same, f"the references agree on {same}; update the module docstring"
    assert (want_hf[:, -1] == 49407).all() and (want_oc[:, -1] == 0).all()  # padding differs too


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("texts,match", [
    (None, r"texts must be a str or a list of str; got NoneType"),
    (5, r"got int"), (b"bytes", r"got bytes"), ({"a set"}, r"got set"),
    (["ok", None], r"texts\[1\] must be a str; got NoneType"),
    (["ok", "fine", 3], r"texts\[2\] must be a str; got int"),
    ([b"raw"], r"texts\[0\].*bytes.*decode"),
    ([["nested"]], r"texts\[0\] must be a str; got list"),
])
def test_non_string_texts_raise_type_error(tok, texts, match):
    with pytest.raises(TypeError, match=match):
        tok(texts)


@pytest.mark.parametrize("length", [0, 1, -5, 7.0, "77", True])
def test_bad_context_length(tok, length):
    with pytest.raises(ValueError, match="context_length must be an int >= 2"):
        tok("x", context_length=length)
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer.default(context_length=length)


def test_hf_dir_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ClipTokenizer.from_hf_dir(tmp_path / "nope")
    d = _write_hub_dir(tmp_path / "hf")
    (d / "merges.txt").rename(d / "merges.bak")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt is missing"):
        ClipTokenizer.from_hf_dir(d)
    good = (d / "merges.bak").read_text(encoding="utf-8")
    (d / "merges.txt").write_text(good.replace("\ni n\n", "\nin\n", 1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges\.txt, line \d+: expected two tokens"):
        ClipTokenizer.from_hf_dir(d)
    (d / "merges.txt").write_text(good + "zzz@@ qqq##\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json: the merges do not fit the vocabulary"):
        ClipTokenizer.from_hf_dir(d)
    (d / "merges.txt").write_text(good, encoding="utf-8")
    (d / "vocab.json").write_text('{"a": 1,', encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json is not valid JSON"):
        ClipTokenizer.from_hf_dir(d)
    (d / "vocab.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json: expected a JSON object"):
        ClipTokenizer.from_hf_dir(d)
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: expected a BPE model"):
        ClipTokenizer.from_hf_dir(d)


# ---- threads -----------------------------------------------------------------------------------

def test_concurrent_calls_match_serial(tok, monkeypatch):
    texts = _random_texts(400, 3) + TRICKY
    want = tok(texts)
    monkeypatch.setattr(tok._encode, "_MAX_WORDS", 64)  # the cache starts over many times meanwhile
    batches = [texts[i::8] for i in range(8)] * 3
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(tok, batches))
    for i, g in enumerate(got):
        assert torch.equal(g, want[i % 8::8])
