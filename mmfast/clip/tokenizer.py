"""CLIP's byte-level BPE tokenizer, id for id with open_clip and with transformers' CLIPTokenizer.

`data/bpe_simple_vocab_16e6.txt.gz` is OpenAI's CLIP BPE file, copied unchanged from open_clip 3.3.0
(MIT License, Copyright (c) 2021 OpenAI).

The BPE merges run in Rust (the `tokenizers` library, batched with `encode_batch_fast`) behind a
word -> ids cache; text cleaning stays in Python where it has to agree with ftfy. Two references,
one mode each, picked by the constructor:

* `ClipTokenizer.default()` matches `open_clip.tokenize`: ftfy.fix_text, html.unescape twice,
  `" ".join(text.split())`, `str.lower()`, CLIP's regex run by the `regex` module with IGNORECASE
  (open_clip's own pattern and module, so their Unicode tables cannot drift apart), BPE; rows
  padded with 0. Printable ASCII without "&" skips ftfy and html.unescape, which leave it unchanged
  (the tests check it); other text pays for ftfy as open_clip does (~50 us a caption).
* `ClipTokenizer.from_hf_dir(path)` matches transformers 5's `CLIPTokenizer`, which always rebuilds
  its pipeline in Rust: NFC, `\\s+` -> " ", lowercase, the same regex run by Oniguruma, byte-level
  BPE, added tokens `<|startoftext|>` / `<|endoftext|>`; rows padded with the pad token's id
  (`<|endoftext|>` = 49407 for OpenAI's files), as `padding="max_length"` does.

Same vocabulary, same text, different ids: where the two references disagree (tests pin each one).
  1. HTML entities: open_clip decodes them (`&amp;` -> `&`, `&lt;3` -> `<3`); HF keeps `&amp;`.
  2. ftfy, open_clip only: full-width forms (`ＡＢＣ` -> `abc`), Latin ligatures (`ﬁ` -> `fi`,
     `ǅ` -> `dž`), curly quotes (`it’s` -> `it's`), mojibake (`cafÃ©` -> `café`), control characters
     dropped (`a\x1cb` -> `ab`; HF keeps \x1c as a symbol), C1 controls read as cp1252
     (`a\x85b` -> `a…b`; HF treats \x85 as a space).
  3. Special tokens in the text: open_clip's are `<start_of_text>` / `<end_of_text>` and match only
     where the regex starts a piece (`!!<end_of_text>` stays text); HF's are `<|startoftext|>` /
     `<|endoftext|>`, matched anywhere, and are plain text to open_clip.
  4. Lowercasing: Python gives a word-final sigma `ς` (`ΟΔΟΣ` -> `οδος`), Rust always `σ`.
  5. Regex: open_clip's IGNORECASE makes `'ſ` a contraction like `'s` and drops U+0345 (combining
     ypogegrammeni) altogether; and `regex` knows newer Unicode than Oniguruma, so a letter the
     latter lacks (e.g. U+10940) joins a word for open_clip and is a symbol piece for HF.
  6. Padding: 0 (open_clip) vs the pad id (HF). Either way the first EOT is the row's argmax.
"""
from __future__ import annotations

import functools
import gzip
import html
import itertools
import json
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

_DEFAULT_BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP's word pattern, shared by both references (open_clip prepends its special tokens).
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_OC_SPECIALS = ("<start_of_text>", "<end_of_text>")
# The exact pattern of open_clip's SimpleTokenizer, run by the same `regex` module.
_OC_SPLIT = regex.compile("|".join(_OC_SPECIALS) + "|" + _WORDS, regex.IGNORECASE)
_HF_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|" + _WORDS  # transformers' CLIPTokenizer
_ABSURD_MAX_LENGTH = 100_000  # transformers writes 1e30 for "no limit"; CLIP's context is 77


def _bytes_to_unicode() -> list[str]:
    # GPT-2 / CLIP's byte -> printable-char table, in CLIP's vocab order (printable bytes first).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # unprintable bytes go to 256, 257, ... in byte order
            cs.append(256 + len(bs) - 188)
            bs.append(b)
    return [chr(c) for c in cs]


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], unk: str | None = None) -> BPE:
    return BPE(vocab=vocab, merges=merges, unk_token=unk, end_of_word_suffix="</w>",
               continuing_subword_prefix="", fuse_unk=False, dropout=None)


def _open_clip_words(text: str) -> list[str]:
    # open_clip's cleaning, whitespace_clean(basic_clean(text)).lower(), cut at its single spaces.
    if text.isascii() and text.isprintable() and "&" not in text:
        return text.lower().split()  # ftfy and html.unescape leave this text unchanged (tested)
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower().split(" ")


def _hf_splitter(added: list[str]):
    # Rust's NFC, \s+ -> " " and lowercasing never act across an ASCII space (a space is an NFC
    # starter that composes with nothing), and no regex piece spans one: cutting the raw text at " "
    # gives the same ids, unless an added token holds whitespace (then nothing is cut).
    if any(ch.isspace() for t in added for ch in t):
        return lambda text: None
    lower_ok = all(t.startswith("<|") for t in added)

    def split(text: str) -> list[str]:
        # Printable ASCII without "<|" can be lowercased here too, so "Cat" and "cat" share an entry.
        if lower_ok and text.isascii() and text.isprintable() and "<|" not in text:
            return text.lower().split()
        return text.split(" ")

    return split


class _WordCache:
    """Texts -> content ids through a word -> ids cache in front of the Rust BPE.

    No CLIP regex piece spans a space, so a text's ids are its words' ids in order; captions repeat
    words far more often than texts, and a dict lookup costs less than a trip through Rust.
    """

    _MAX_WORDS = 200_000  # ~40 MB; past it the cache starts over

    def __init__(self, split, encode_words, encode_texts=None):
        self._split = split                # text -> words, or None: encode_texts takes it whole
        self._encode_words = encode_words  # unique words -> their ids, one batched Rust call
        self._encode_texts = encode_texts
        self._cache: dict[str, list[int]] = {}

    def __call__(self, texts: list[str]) -> list[list[int]]:
        words = [self._split(t) for t in texts]
        # Thread safety: this call reads only the dict it takes here (dict reads and updates are
        # atomic); a call that starts the cache over swaps in a new dict instead of clearing it.
        cache = self._cache
        new = list({w for ws in words if ws is not None for w in ws if w not in cache})
        if new:
            ids = self._encode_words(new)
            if len(cache) + len(new) > self._MAX_WORDS:  # start over, keeping this call's words
                cache = {w: cache[w] for ws in words if ws is not None for w in ws if w in cache}
                self._cache = cache
            cache.update(zip(new, ids))
        out = [None if ws is None else [i for w in ws for i in cache[w]] for ws in words]
        rest = [i for i, ws in enumerate(words) if ws is None]
        if rest:
            for i, ids in zip(rest, self._encode_texts([texts[i] for i in rest])):
                out[i] = ids
        return out


@functools.lru_cache(maxsize=2)
def _open_clip_encoder(path: str) -> tuple[_WordCache, dict[str, int]]:
    # Same construction as open_clip's SimpleTokenizer: 256 byte chars, the same with </w>, the
    # first 48894 merges in file order, then the two special tokens: 49408 ids.
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(_OC_SPECIALS)
    vocab = {t: i for i, t in enumerate(tokens)}
    # Words arrive split into pieces by _OC_SPLIT; a piece that is a special token maps to its id.
    bpe = Tokenizer(_bpe(vocab, merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _OC_SPECIALS])

    def encode_words(words: list[str]) -> list[list[int]]:
        # Split in Python by open_clip's own pattern and module, which sees the same Unicode tables
        # as open_clip; Oniguruma (the Rust regex) ships older ones.
        pieces = [_OC_SPLIT.findall(w) for w in words]
        return [e.ids for e in bpe.encode_batch_fast(pieces, is_pretokenized=True, add_special_tokens=False)]

    return _WordCache(_open_clip_words, encode_words), vocab


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-save the tokenizer folder.") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    # The format tokenizers' BPE.from_file reads: "#version" lines skipped, "a b" per line.
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    merges = []
    for n, line in enumerate(lines, 1):
        if line.startswith("#version"):
            continue
        parts = line.rstrip("\r").split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}, line {n}: expected two tokens separated by one space, got {line!r:.80}; "
                             "the file is corrupt.")
        merges.append((parts[0], parts[1]))
    return merges


def _read_hf_dir(d: Path) -> dict:
    """Vocab, merges, special and added tokens of a HF CLIP tokenizer folder, read as transformers 5 does."""
    if not d.is_dir():
        raise FileNotFoundError(f"path: {d} is not a directory; pass a Hugging Face tokenizer folder "
                                "(vocab.json + merges.txt, or tokenizer.json).")
    cfg_path = d / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    smap = _read_json(d / "special_tokens_map.json") if (d / "special_tokens_map.json").is_file() else {}
    added: dict[str, dict] = {}  # content -> AddedToken kwargs
    if (d / "tokenizer.json").is_file():  # transformers takes vocab and merges from here first
        source = d / "tokenizer.json"
        tj = _read_json(source)
        model = tj.get("model") or {}
        vocab, merges = model.get("vocab"), model.get("merges")
        if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
            raise ValueError(f"{source}: expected a BPE model with a vocab dict and a merges list; "
                             f"got model type {model.get('type')!r}. Is this a CLIP tokenizer?")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        for t in tj.get("added_tokens") or []:
            added[t["content"]] = t
    else:
        source = d / "vocab.json"
        for f in (source, d / "merges.txt"):
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing; a HF CLIP tokenizer folder needs vocab.json + "
                                        "merges.txt, or tokenizer.json.")
        vocab, merges = _read_json(source), _read_merges(d / "merges.txt")
        if not isinstance(vocab, dict):
            raise ValueError(f"{source}: expected a JSON object token -> id, got {type(vocab).__name__}.")
    # tokenizer_config.json's flags win over tokenizer.json's (transformers does the same).
    for t in (cfg.get("added_tokens_decoder") or {}).values():
        added[t["content"]] = t
    specials = {}
    for name, default in (("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"),
                          ("pad", "<|endoftext|>"), ("unk", "<|endoftext|>")):
        tok = cfg.get(f"{name}_token") or smap.get(f"{name}_token") or default
        specials[name] = tok["content"] if isinstance(tok, dict) else str(tok)
        added.setdefault(specials[name], {"content": specials[name], "normalized": False, "special": True})
    keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
    return {"vocab": vocab, "merges": merges, "source": source, "specials": specials,
            "added": [{k: t.get(k, k == "normalized") for k in keys} for t in added.values()],
            "model_max_length": cfg.get("model_max_length")}


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a str or a list of str; got {type(texts).__name__}. "
                        "Pass one caption as a str or several as a list.")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            hint = " Decode bytes first, e.g. b.decode('utf-8')." if isinstance(t, (bytes, bytearray)) else ""
            raise TypeError(f"texts[{i}] must be a str; got {type(t).__name__} ({t!r:.60}).{hint}")
    return list(texts)


def _check_length(context_length) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for the start and end tokens); "
                         f"got {context_length!r}. CLIP models use 77.")
    return context_length


class ClipTokenizer:
    """CLIP text -> token ids `torch.LongTensor [N, context_length]`; safe to call from several threads.

    Build it with `ClipTokenizer.default()` (open_clip's ids) or `ClipTokenizer.from_hf_dir(path)`
    (transformers' ids); see the module docstring for where the two differ.

    Examples
    --------
    >>> tok = ClipTokenizer.default()
    >>> tok(["a photo of a cat", "кошка на диване"]).shape
    torch.Size([2, 77])
    """

    def __init__(self, *, reference: str, encode, sot_id: int, eot_id: int, pad_id: int,
                 vocab_size: int, context_length: int):
        # Private: use default() or from_hf_dir(). Nothing here changes after construction; the Rust
        # tokenizers are only read and the word cache is thread-safe (see _WordCache).
        self.reference = reference
        self._encode = encode  # list[str] -> list[list[int]], content ids without SOT/EOT
        self._sot, self._eot, self._pad = sot_id, eot_id, pad_id
        self._vocab_size = vocab_size
        self._context_length = _check_length(context_length)

    sot_id = property(lambda self: self._sot, doc="id of the start-of-text token (49406)")
    eot_id = property(lambda self: self._eot, doc="id of the end-of-text token (49407)")
    pad_id = property(lambda self: self._pad, doc="id filling rows after EOT (0 for open_clip)")
    vocab_size = property(lambda self: self._vocab_size, doc="number of ids, specials included")
    context_length = property(lambda self: self._context_length, doc="default row length")

    def __repr__(self) -> str:
        return (f"ClipTokenizer(reference={self.reference!r}, vocab_size={self._vocab_size}, "
                f"context_length={self._context_length})")

    @classmethod
    def default(cls, context_length: int = 77) -> ClipTokenizer:
        """OpenAI's CLIP vocabulary with open_clip's cleaning: the ids of `open_clip.tokenize`.

        Parameters
        ----------
        context_length : int
            Row length of the output (77 for every CLIP model).
        """
        encode, vocab = _open_clip_encoder(str(_DEFAULT_BPE))
        return cls(reference="open_clip", encode=encode, sot_id=vocab["<start_of_text>"],
                   eot_id=vocab["<end_of_text>"], pad_id=0, vocab_size=len(vocab), context_length=context_length)

    @classmethod
    def from_hf_dir(cls, path, context_length: int | None = None) -> ClipTokenizer:
        """A Hugging Face CLIP tokenizer folder: the ids of transformers' `CLIPTokenizer`.

        Reads `tokenizer.json` if present (as transformers does), else `vocab.json` + `merges.txt`;
        special tokens and their flags come from those files and `tokenizer_config.json`.

        Parameters
        ----------
        path : str or Path
            The folder (e.g. a downloaded `openai/clip-vit-base-patch32`).
        context_length : int, optional
            Row length; defaults to the folder's `model_max_length`, or 77 when that is unset.
        """
        files = _read_hf_dir(Path(path))
        try:
            backend = Tokenizer(_bpe(files["vocab"], files["merges"], unk=files["specials"]["unk"]))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for a bad merge
            raise ValueError(f"{files['source']}: the merges do not fit the vocabulary ({e}); "
                             "the tokenizer files are corrupt or from different models.") from None
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_HF_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        added = files["added"]
        backend.add_special_tokens([AddedToken(**t) for t in added if t["special"]])
        backend.add_tokens([AddedToken(**t) for t in added if not t["special"]])
        ids = {name: backend.token_to_id(tok) for name, tok in files["specials"].items()}

        def encode_texts(texts: list[str]) -> list[list[int]]:
            try:
                return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
            except TypeError:  # PyO3 refuses strings that are not valid Unicode (lone surrogates)
                for i, t in enumerate(texts):
                    try:
                        t.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise ValueError(f"texts hold invalid Unicode ({e.reason}) in {t!r:.60}; "
                                         "fix or drop the lone surrogate.") from None
                raise

        encode = _WordCache(_hf_splitter([t["content"] for t in added]), encode_texts, encode_texts)
        limit = files["model_max_length"]
        if context_length is None:
            context_length = limit if isinstance(limit, int) and 2 <= limit <= _ABSURD_MAX_LENGTH else 77
        return cls(reference="transformers", encode=encode, sot_id=ids["bos"], eot_id=ids["eos"],
                   pad_id=ids["pad"], vocab_size=backend.get_vocab_size(with_added_tokens=True),
                   context_length=context_length)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize, add SOT/EOT, truncate (EOT stays last), pad.

        Parameters
        ----------
        texts : str or list of str
            One caption or a batch of them; any Unicode, any length.
        context_length : int, optional
            Row length; defaults to `self.context_length`.

        Returns
        -------
        torch.LongTensor
            `[N, context_length]`: SOT, up to context_length - 2 content ids, EOT, then `pad_id`.
        """
        texts = _check_texts(texts)
        length = self._context_length if context_length is None else _check_length(context_length)
        rows = self._encode(texts)
        n, keep = len(rows), length - 2
        lens = np.fromiter(map(len, rows), np.int64, n)
        flat = np.fromiter(itertools.chain.from_iterable(rows), np.int64, int(lens.sum()))
        kept = np.minimum(lens, keep)  # truncation keeps the first `keep` content ids
        out = np.full((n, length), self._pad, dtype=np.int64)  # (N, L)
        out[:, 0] = self._sot
        col = np.arange(keep)
        mask = col[None, :] < kept[:, None]  # (N, L - 2)
        out[:, 1:keep + 1][mask] = flat[((np.cumsum(lens) - lens)[:, None] + col[None, :])[mask]]
        out[np.arange(n), kept + 1] = self._eot  # EOT right after the content, last if truncated
        return torch.from_numpy(out)
