"""min-dalle's own modules with random weights, saved as min-dalle's files, and its decode loop.

min-dalle's model classes are built directly (no download). Importing min_dalle switches autograd
off for the whole process and sets the thread count; both are put back here.
"""
import collections
import json

import numpy as np
import pytest
import torch

from mmfast.dalle import dalle_preset

_grad, _threads = torch.is_grad_enabled(), torch.get_num_threads()
min_dalle = pytest.importorskip("min_dalle")
torch.set_grad_enabled(_grad)
torch.set_num_threads(_threads)
from min_dalle.models import DalleBartDecoder, DalleBartEncoder  # noqa: E402
from min_dalle.text_tokenizer import TextTokenizer  # noqa: E402

G = chr(ord(" ") + 256)  # "Ġ"
CORPUS = """a photo of an astronaut riding a horse on the moon, in the style of van gogh!
the cat's hat is red; dogs don't wear hats. 3 pink flamingos & 12 blue whales (underwater)?
portrait of a teacher -- watercolor, trending on artstation: 4k hdr ... photorealistic "sunset"
there there where were we? these things then those other thinkers, rather than otherwise
"""


def train_bpe(text: str, merges: int):
    """A small, consistent BART-like vocabulary: specials, Ġ, printable ASCII, then learned merges."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in [G] + [chr(c) for c in range(33, 127)]:
        vocab[c] = len(vocab)
    seqs = [[G] + list(w) for w in text.lower().split()]
    lines = []
    for _ in range(merges):
        counts = collections.Counter(p for s in seqs for p in zip(s, s[1:]))
        if not counts:
            break
        (a, b), _ = counts.most_common(1)[0]
        lines.append(f"{a} {b}")
        vocab.setdefault(a + b, len(vocab))
        new = []
        for s in seqs:
            t, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    t.append(a + b)
                    i += 2
                else:
                    t.append(s[i])
                    i += 1
            new.append(t)
        seqs = new
    return vocab, lines


def _randomize(module: torch.nn.Module, gen: torch.Generator):
    # nn.LayerNorm starts at weight 1 / bias 0; perturb every parameter so each one matters.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(folder with min-dalle's files, min-dalle encoder, decoder, TextTokenizer, vocab, merges)."""
    cfg = dalle_preset("dalle-tiny")
    torch.manual_seed(0)
    enc = DalleBartEncoder(layer_count=cfg.encoder_layers, embed_count=cfg.width,
                           attention_head_count=cfg.heads, text_vocab_count=cfg.text_vocab,
                           text_token_count=cfg.text_tokens, glu_embed_count=cfg.glu_dim, device="cpu").eval()
    dec = DalleBartDecoder(image_vocab_count=cfg.image_vocab, embed_count=cfg.width,
                           attention_head_count=cfg.heads, glu_embed_count=cfg.glu_dim,
                           layer_count=cfg.decoder_layers, device="cpu").eval()
    gen = torch.Generator().manual_seed(1)
    _randomize(enc, gen)
    _randomize(dec, gen)
    vocab, merges = train_bpe(CORPUS, 250)
    assert len(vocab) <= cfg.text_vocab
    d = tmp_path_factory.mktemp("models_root") / "dalle_bart_mini"
    d.mkdir()
    torch.save(enc.state_dict(), d / "encoder.pt")
    torch.save(dec.state_dict(), d / "decoder.pt")
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf8")
    return d, enc, dec, TextTokenizer(vocab, merges), vocab, merges


def min_dalle_text_tokens(tokenizer, text: str) -> torch.Tensor:
    """The [2, 64] text rows of MinDalle.generate_raw_image_stream (row 0 unconditioned)."""
    tokens = tokenizer.tokenize(text)
    if len(tokens) > 64:
        tokens = tokens[:64]
    text_tokens = np.ones((2, 64), dtype=np.int32)
    text_tokens[0, :2] = [tokens[0], tokens[-1]]
    text_tokens[1, :len(tokens)] = tokens
    return torch.tensor(text_tokens, dtype=torch.long)


@torch.no_grad()
def min_dalle_loop(enc, dec, tokenizer, text, image_count, *, temperature=1.0, top_k=1, guidance=16.0,
                   forced=None, on_logits=None):
    """MinDalle.generate_raw_image_stream's token loop, verbatim except for the VQGAN (fp32, CPU).

    forced [image_count, 256]: feed these tokens instead of the sampled ones (teacher forcing);
    on_logits(i, logits [2 * image_count, 16384]) sees the decoder's logits of every step.
    """
    text_tokens = min_dalle_text_tokens(tokenizer, text)
    encoder_state = enc.forward(text_tokens)
    expanded_indices = [0] * image_count + [1] * image_count
    text_tokens = text_tokens[expanded_indices]
    encoder_state = encoder_state[expanded_indices]
    attention_mask = text_tokens.not_equal(1)[:, None, None, :]
    attention_state = torch.zeros(size=(dec.layer_count, image_count * 4, 256, dec.embed_count))
    image_tokens = torch.full((image_count, 256 + 1), 2 ** 14 - 1, dtype=torch.long)
    token_indices = torch.arange(256)
    settings = torch.tensor([temperature, top_k, guidance], dtype=torch.float32)
    for i in range(256):
        kwargs = dict(attention_mask=attention_mask, encoder_state=encoder_state,
                      attention_state=attention_state, prev_tokens=image_tokens[:, [i]],
                      token_index=token_indices[[i]])
        if on_logits is not None:  # the same forward sample_tokens runs, on a copy of the cache
            logits, _ = dec.forward(**{**kwargs, "attention_state": attention_state.clone()})
            on_logits(i, logits[:, -1, : 2 ** 14])
        image_tokens[:, i + 1], attention_state = dec.sample_tokens(settings=settings, **kwargs)
        if forced is not None:
            image_tokens[:, i + 1] = forced[:, i]
    return image_tokens[:, 1:]


@pytest.fixture(autouse=True)
def _tiny_models_run_on_one_thread(one_thread):
    pass
