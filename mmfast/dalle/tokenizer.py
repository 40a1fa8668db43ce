"""min-dalle's BART text tokenizer, id for id with `min_dalle.text_tokenizer.TextTokenizer`.

min-dalle's text handling, which we reproduce step by step:
1. emoji become their English names (`emoji.demojize(text, delimiters=("", ""))`: "🐱" -> "cat_face");
2. `str.lower()`, then every non-ASCII character is dropped (`.encode("ascii", "ignore")`);
3. words are cut at single spaces " " only (tabs and newlines stay inside words), empty ones skipped;
4. each word, prefixed with "Ġ" (GPT-2's space), is BPE-merged over its raw characters (no
   byte-level mapping: a tab stays a tab, which no vocabulary holds, so it becomes <unk>);
5. ids are `<s>`, the words' ids (unknown pieces -> `<unk>`), `</s>`.

Step 4 runs in Rust (the `tokenizers` BPE, behind a word cache). It picks merges exactly as
min-dalle's loop does (lowest rank first, leftmost first; a repeated merge line takes its last
rank in both). min-dalle tolerates two things Rust's BPE refuses to build with: a merge whose parts
or result are not in vocab.json. Such strings get ids past the vocabulary here, mapped to <unk>
afterwards, which is exactly min-dalle's `vocab.get(subword, unk)`. Steps 1-3 stay in Python
(ASCII-only text skips demojize, which leaves it unchanged: no emoji is ASCII).

Prompts longer than `text_tokens` (64) ids are cut as min-dalle cuts them: the first 64 ids are
kept, so `</s>` is lost, and the unconditioned row is `[<s>, last kept id]` (min-dalle builds it
from the first and last id of the cut list). A warning says so.
"""
from __future__ import annotations

import json
import os
import unicodedata
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE

_SPACE = chr(ord(" ") + 256)  # "Ġ": GPT-2's byte-level form of the space that starts every word


def _demojize(text: str) -> str:
    try:
        import emoji
    except ImportError:
        raise ImportError("DALL·E prompts with non-ASCII characters need the `emoji` package (min-dalle "
                          "turns emoji into words with it): pip install emoji") from None
    return emoji.demojize(text, delimiters=("", ""))


def clean_text(text: str) -> str:
    """min-dalle's text cleaning: emoji -> names, lower-case, non-ASCII dropped."""
    if not text.isascii():
        text = _demojize(text)
    return text.lower().encode("ascii", errors="ignore").decode()


def clean_unicode(text: str) -> str:
    """The multilingual cleaning (`cleaning="unicode"`, e.g. mmfast's English + Russian demo model):
    Unicode NFC, lower-case; every letter kept."""
    return unicodedata.normalize("NFC", text).lower()


CLEANING = {"min-dalle": clean_text, "unicode": clean_unicode}


def read_merges(path) -> list[str]:
    """merges.txt as min-dalle reads it: split at "\\n", first line (the #version header) and last dropped."""
    with open(path, encoding="utf8") as f:
        return f.read().split("\n")[1:-1]


class DalleTokenizer:
    """Prompts -> min-dalle's text rows `LongTensor [P, 2, text_tokens]` (unconditioned, conditioned).

    Parameters
    ----------
    vocab : dict str -> int, min-dalle's `vocab.json`.
    merges : list of "a b" lines, as `read_merges` returns them (header already removed).
    text_tokens : row length (64 for every released model).
    pad_token : id filling the rows (min-dalle writes 1, BART's <pad>).
    cleaning : "min-dalle" (steps 1-2 above: ASCII only, the released models) or "unicode" (NFC,
        lower-case, every letter kept: vocabularies learned on other scripts, e.g. Russian).

    Example
    -------
    >>> tok = DalleTokenizer.from_files("dalle_bart_mini/vocab.json", "dalle_bart_mini/merges.txt")
    >>> tok(["a cat"]).shape
    torch.Size([1, 2, 64])
    """

    def __init__(self, vocab: dict, merges: list[str], *, text_tokens: int = 64, pad_token: int = 1,
                 cleaning: str = "min-dalle"):
        if cleaning not in CLEANING:
            raise ValueError(f"cleaning must be one of {', '.join(map(repr, CLEANING))}, got {cleaning!r}")
        self.cleaning, self._clean = cleaning, CLEANING[cleaning]
        for name in ("<s>", "</s>", "<unk>"):
            if name not in vocab:
                raise ValueError(f"vocab has no {name!r} token; is it min-dalle's BART vocab.json?")
        self.text_tokens, self.pad_token = text_tokens, pad_token
        self.bos, self.eos, self.unk = vocab["<s>"], vocab["</s>"], vocab["<unk>"]
        pairs = [p for p in (tuple(m.split()) for m in merges) if len(p) == 2]  # others never match
        # Strings Rust's BPE needs in its vocabulary but vocab.json lacks: ids past every real id,
        # mapped back to <unk> after encoding (see the module docstring).
        self._first_extra = max(vocab.values(), default=-1) + 1
        full = dict(vocab)
        for a, b in pairs:
            for s in (a, b, a + b):
                if s not in full:
                    full[s] = self._first_extra + len(full) - len(vocab)
        unk = "<unk>"
        self._bpe = Tokenizer(BPE(vocab=full, merges=pairs, unk_token=unk, fuse_unk=False))
        self._cache: dict[str, list[int]] = {}  # word -> ids; dict reads/updates are thread-safe

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike, **kwargs):
        """min-dalle's `vocab.json` and `merges.txt`."""
        path = Path(vocab_path)
        try:
            vocab = json.loads(path.read_text(encoding="utf8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a JSON vocabulary ({e}); re-download min-dalle's vocab.json") from None
        if not isinstance(vocab, dict):
            raise ValueError(f"{path}: expected a JSON object token -> id, got {type(vocab).__name__}")
        bad = next(((k, v) for k, v in vocab.items() if type(v) is not int or not 0 <= v < 2 ** 31), None)
        if bad is not None:
            raise ValueError(f"{path}: token {bad[0]!r} has id {bad[1]!r}; ids must be ints in [0, 2**31)")
        try:
            merges = read_merges(merges_path)
        except UnicodeDecodeError as e:
            raise ValueError(f"{merges_path} is not a UTF-8 text file ({e}); re-download min-dalle's merges.txt") from None
        try:
            return cls(vocab, merges, **kwargs)
        except Exception as e:  # noqa: BLE001 - ValueError here, or the Rust tokenizer's own refusal
            raise ValueError(f"{path} / {merges_path} do not make a BPE tokenizer: {e}") from None

    def _words(self, words: list[str]) -> list[int]:
        cache = self._cache
        new = list({w for w in words if w not in cache})
        if new:
            enc = self._bpe.encode_batch_fast([[_SPACE + w] for w in new], is_pretokenized=True,
                                              add_special_tokens=False)
            unk, first = self.unk, self._first_extra
            for w, e in zip(new, enc):
                cache[w] = [unk if i >= first else i for i in e.ids]
        return [i for w in words for i in cache[w]]

    def tokenize(self, text: str) -> list[int]:
        """min-dalle's `TextTokenizer.tokenize`: `[<s>, ids..., </s>]`, not truncated."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        words = [w for w in self._clean(text).split(" ") if w]
        return [self.bos] + self._words(words) + [self.eos]

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """Text rows of min-dalle's encoder: [P, 2, text_tokens] int64, row 0 unconditioned.

        Row 1 holds the prompt's ids (cut to text_tokens, with a warning), row 0 `[<s>, last id]`
        (`</s>` unless cut); both padded with `pad_token`.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = torch.full((len(prompts), 2, self.text_tokens), self.pad_token, dtype=torch.long)
        for i, text in enumerate(prompts):
            ids = self.tokenize(text)
            if len(ids) > self.text_tokens:
                warnings.warn(f"prompt {i} has {len(ids)} text tokens; only the first {self.text_tokens} "
                              f"are used (as min-dalle does, the end token is cut too): {text[:60]!r}...",
                              stacklevel=2)
                ids = ids[: self.text_tokens]
            out[i, 0, :2] = torch.tensor([ids[0], ids[-1]])
            out[i, 1, : len(ids)] = torch.tensor(ids)
        return out
