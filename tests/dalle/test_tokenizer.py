"""DalleTokenizer gives min-dalle's TextTokenizer ids on any text, and min-dalle's text rows."""
import random
import warnings

import pytest
import torch

from mmfast.dalle import DalleTokenizer
from mmfast.dalle.tokenizer import read_merges

from .conftest import CORPUS, G, TextTokenizer, min_dalle_text_tokens, train_bpe

FIXED = [
    "", " ", "a", "A Photo of an Astronaut riding a HORSE on the moon!",
    "the cat's hat -- isn't it?", "  double  spaces\tand\ttabs\nand\r\nnewlines ",
    "café crème brûlée, Straße, İstanbul, KELVIN \u212a, ﬁne", "猫の写真 кошка 🐱 👍🏽 🇫🇷 ❤️ #️⃣",
    "emoji glued🐱to words🐶!", "<s> </s> <pad> <unk> <mask>", "\x00\x01\x7f control",
    "lone \ud800 surrogate", "x" * 300, "word " * 80,
]
ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789") + list(" " * 8) + list("\t\n.,;:!?'\"-()&#<>/\\_")
            + ["é", "ß", "İ", "\u212a", "ﬁ", "猫", "к", "🐱", "👍🏽", "🇫🇷", "\u200d", "\ufe0f", "\x00", "\x7f"])


@pytest.fixture(scope="module")
def pair(tiny):
    d, *_ , vocab, merges = tiny
    return DalleTokenizer.from_files(d / "vocab.json", d / "merges.txt"), TextTokenizer(vocab, merges)


def _random_texts(n, seed=0):
    rng = random.Random(seed)
    words = CORPUS.split()
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 120))))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))))
    return out


def test_ids_match_min_dalle(pair):
    ours, ref = pair
    for text in FIXED + _random_texts(400):
        assert ours.tokenize(text) == ref.tokenize(text), repr(text)


def test_merges_file_read_as_min_dalle(tiny):
    d, *_, merges = tiny
    assert read_merges(d / "merges.txt") == merges


def test_odd_merges_match_min_dalle():
    # min-dalle accepts merges whose parts or result are missing from the vocabulary (Rust's BPE
    # refuses them), repeated merges (the last rank wins), badly formed lines and merge ranks that
    # contradict the order tokens were built in.
    vocab, merges = train_bpe(CORPUS, 120)
    rng = random.Random(1)
    merged = [m for m in merges if "".join(m.split()) in vocab]
    for m in rng.sample(merged, 15):  # result dropped from vocab
        del vocab["".join(m.split())]
    odd = merges[:] + ["\t a", "a \t", f"{G} \t", "t h", "one", "", "a b c"] + rng.sample(merges, 10)
    rng.shuffle(odd)
    vocab = {k: i for i, k in enumerate(vocab)}  # ids contiguous again
    ours, ref = DalleTokenizer(vocab, odd), TextTokenizer(vocab, odd)
    for text in FIXED + _random_texts(300, seed=2) + ["\ta\t", "the\tthere"]:
        assert ours.tokenize(text) == ref.tokenize(text), repr(text)


def test_rows_match_min_dalle(pair):
    ours, ref = pair
    texts = ["a cat", "An astronaut riding a horse, in the style of van gogh!", "🐱", "word " * 80]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = ours(texts)
    assert rows.shape == (4, 2, 64) and rows.dtype == torch.long
    for i, text in enumerate(texts):
        assert torch.equal(rows[i], min_dalle_text_tokens(ref, text)), text
    # only the long prompt is cut, with a warning; as min-dalle, its unconditioned row ends on
    # the last kept id, not on </s>
    assert len(caught) == 1 and "prompt 3" in str(caught[0].message)
    assert rows[3, 1, 63] != ours.eos and rows[3, 0, 1] == rows[3, 1, 63]


def test_unknown_vocab_is_rejected():
    with pytest.raises(ValueError, match="'<unk>'"):
        DalleTokenizer({"<s>": 0, "</s>": 2}, [])


def test_unicode_cleaning_keeps_other_scripts():
    from mmfast.dalle.tokenizer import DalleTokenizer
    space = chr(ord(" ") + 256)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in [space] + list("abcdefghijklmnopqrstuvwxyzабвгдеёжзийклмнопрстуфхцчшщъыьэюя"):
        vocab[ch] = len(vocab)
    uni = DalleTokenizer(vocab, [], cleaning="unicode")
    ids = uni.tokenize("Синий КВАДРАТ")
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids and len(ids) == 2 + 2 + 5 + 7   # Ġ + letters per word
    assert DalleTokenizer(vocab, []).tokenize("Синий квадрат") == [0, 2]                # min-dalle's: ASCII only
    assert uni.tokenize("Ёж") == uni.tokenize("Ё".lower() + "ж")                      # NFC, lower-case
    import pytest
    with pytest.raises(ValueError, match="cleaning must be one of"):
        DalleTokenizer(vocab, [], cleaning="ascii")
