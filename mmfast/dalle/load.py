"""min-dalle's files -> (DalleConfig, encoder / decoder state dicts, tokenizer files, VQGAN path).

Layouts understood (nothing is downloaded; weights are read as data by `mmfast.io.read_state_dict`):
- a model folder holding `encoder.pt`, `decoder.pt` (or `encoder.safetensors`, `decoder.safetensors`),
  `vocab.json`, `merges.txt`, and optionally `config.json` (below);
- min-dalle's `models_root`: `dalle_bart_mini/` and / or `dalle_bart_mega/` (each a model folder)
  beside `vqgan/detoker.pt`; `variant="mini"` / `"mega"` picks one when both are there.
The VQGAN detokenizer is only located (`DalleCheckpoint.detoker`, or None): `mmfast.vqgan` loads it.

The config comes from the tensor shapes; heads are width / 64 (both released models; shapes do not
show it). A model that differs in what the shapes cannot show (a small codebook with its own start
token, other head counts: `mmfast.demo`'s generator) says so in `config.json`: any of `heads`,
`codebook_size`, `start_token`, `text_pad_token`, `vqgan`, the path (relative to the folder) of
the VQGAN that decodes its tokens, and `text_cleaning` ("unicode" for vocabularies beyond ASCII). min-dalle loads with `strict=False`; here a missing key or a
wrong shape is an error naming the key and both shapes, while extra keys are ignored with a warning.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import read_json, read_state_dict
from .config import DalleConfig
from .model import DalleDecoder, DalleEncoder
from .tokenizer import CLEANING, DalleTokenizer

_VARIANTS = {"mini": "dalle_bart_mini", "mega": "dalle_bart_mega"}
_FILES = ("encoder.pt", "decoder.pt", "vocab.json", "merges.txt")
_WEIGHT_EXTS = (".pt", ".safetensors")  # min-dalle's files, or the same state dicts as safetensors
HEAD_DIM = 64  # both released models; the weights do not record the head count
# config.json keys: what the tensor shapes cannot show
_CONFIG_KEYS = ("heads", "codebook_size", "start_token", "text_pad_token")


@dataclass(frozen=True)
class DalleCheckpoint:
    config: DalleConfig
    encoder: dict          # name -> tensor, min-dalle's DalleBartEncoder names
    decoder: dict          # name -> tensor, min-dalle's DalleBartDecoder names
    vocab: Path
    merges: Path
    detoker: Path | None   # the VQGAN for mmfast.vqgan (min-dalle's vqgan/detoker.pt, or config.json's
                           # "vqgan"); None when absent
    cleaning: str = "min-dalle"   # the tokenizer's text cleaning (config.json's text_cleaning)


def find_model_dir(path, variant: str | None = None) -> Path:
    """The folder holding encoder.pt / decoder.pt / vocab.json / merges.txt (see the module docstring)."""
    path = Path(path)
    if variant is not None and variant not in _VARIANTS:
        raise ValueError(f"variant must be 'mini', 'mega' or None, got {variant!r}")
    if not path.is_dir():
        raise FileNotFoundError(f"DALL·E checkpoint folder {str(path)!r} does not exist or is not a folder; "
                                f"pass min-dalle's models_root or a folder holding {', '.join(_FILES)}")
    if any((path / f"{part}{ext}").exists() for part in ("encoder", "decoder") for ext in _WEIGHT_EXTS):
        model_dir = path
    else:
        found = {v: path / d for v, d in _VARIANTS.items() if (path / d).is_dir()}
        if not found:
            raise FileNotFoundError(f"{str(path)!r} holds neither encoder.pt / decoder.pt nor min-dalle's "
                                    f"dalle_bart_mini/ or dalle_bart_mega/ folders")
        if variant is None and len(found) > 1:
            raise ValueError(f"{str(path)!r} holds both dalle_bart_mini/ and dalle_bart_mega/; pass "
                             "variant='mini' or variant='mega'")
        if variant is not None and variant not in found:
            raise FileNotFoundError(f"{str(path)!r} has no {_VARIANTS[variant]}/ folder (found: "
                                    f"{', '.join(d.name for d in found.values())})")
        model_dir = found[variant] if variant else next(iter(found.values()))
    missing = [f for f in _FILES if not (model_dir / f).is_file()
               and not (f.endswith(".pt") and (model_dir / f).with_suffix(".safetensors").is_file())]
    if missing:
        raise FileNotFoundError(f"{str(model_dir)!r} lacks {', '.join(missing)}; a min-dalle model folder "
                                f"holds {', '.join(_FILES)}")
    return model_dir


def _weights(model_dir: Path, part: str) -> Path:
    for ext in _WEIGHT_EXTS:
        if (model_dir / f"{part}{ext}").is_file():
            return model_dir / f"{part}{ext}"
    raise FileNotFoundError(f"{str(model_dir)!r} has no {part}.pt or {part}.safetensors")


def _read_config(model_dir: Path) -> dict:
    """config.json's overrides (see the module docstring); {} when there is none."""
    path = model_dir / "config.json"
    if not path.is_file():
        return {}
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_CONFIG_KEYS) - {"vqgan", "comment", "text_cleaning"})
    if unknown:
        raise ValueError(f"{str(path)!r}: unknown keys {unknown}; allowed: {', '.join(_CONFIG_KEYS)}, vqgan, "
                         "text_cleaning")
    if raw.get("text_cleaning", "min-dalle") not in CLEANING:
        raise ValueError(f"{str(path)!r}: text_cleaning must be one of {', '.join(map(repr, CLEANING))}, got "
                         f"{raw['text_cleaning']!r}")
    for k in _CONFIG_KEYS:
        if k in raw and (isinstance(raw[k], bool) or not isinstance(raw[k], int)):
            raise ValueError(f"{str(path)!r}: {k} must be an int, got {raw[k]!r}")
    return raw


def _find_detoker(model_dir: Path, config: dict) -> Path | None:
    if "vqgan" in config:
        p = (model_dir / str(config["vqgan"])).resolve()
        if not p.exists():
            raise FileNotFoundError(f"{str(model_dir / 'config.json')!r} names the VQGAN {config['vqgan']!r}, "
                                    f"but {str(p)!r} does not exist")
        return p
    for p in (model_dir / "vqgan" / "detoker.pt", model_dir / "detoker.pt",
              model_dir.parent / "vqgan" / "detoker.pt"):  # the last: min-dalle's models_root layout
        if p.is_file():
            return p
    return None


def _layer_count(sd: dict) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})


def _shape(sd: dict, key: str, file: Path) -> tuple:
    if key not in sd:
        raise ValueError(f"{str(file)!r} has no {key!r}; it is not a min-dalle "
                         f"{'decoder' if 'decoder' in file.name else 'encoder'} file")
    return tuple(sd[key].shape)


def infer_config(enc: dict, dec: dict, enc_file: Path, dec_file: Path, overrides: dict | None = None) -> DalleConfig:
    """The architecture of a min-dalle encoder / decoder pair, from its tensor shapes (and `overrides`,
    config.json's `heads` / `codebook_size` / `start_token` / `text_pad_token`)."""
    overrides = {k: v for k, v in (overrides or {}).items() if k in _CONFIG_KEYS}
    if "lm_head.weight" in enc or any(".encoder_attn." in k for k in enc):
        raise ValueError(f"{str(enc_file)!r} is a decoder file (it has lm_head / encoder_attn weights); "
                         "pass the encoder as encoder.pt and the decoder as decoder.pt")
    if "lm_head.weight" not in dec and not any(".encoder_attn." in k for k in dec) and \
            "embed_tokens.weight" in dec:
        raise ValueError(f"{str(dec_file)!r} is an encoder file (no lm_head / encoder_attn weights); "
                         "pass the decoder as decoder.pt and the encoder as encoder.pt")
    text_vocab, width = _shape(enc, "embed_tokens.weight", enc_file)
    text_tokens = _shape(enc, "embed_positions.weight", enc_file)[0]
    glu = _shape(enc, "layers.0.glu.fc0.weight", enc_file)[0]
    rows, dec_width = _shape(dec, "lm_head.weight", dec_file)
    image_tokens = _shape(dec, "embed_positions.weight", dec_file)[0]
    if dec_width != width:
        raise ValueError(f"encoder and decoder widths differ: {str(enc_file)!r} embed_tokens.weight is "
                         f"{(text_vocab, width)} but {str(dec_file)!r} lm_head.weight is {(rows, dec_width)}; "
                         "the two files come from different models")
    if width % HEAD_DIM and "heads" not in overrides:
        raise ValueError(f"width {width} ({str(enc_file)!r} embed_tokens.weight) is not a multiple of "
                         f"the {HEAD_DIM}-wide heads of min-dalle's models")
    shapes = dict(encoder_layers=_layer_count(enc), decoder_layers=_layer_count(dec), width=width,
                  heads=width // HEAD_DIM, glu_dim=glu, text_vocab=text_vocab, text_tokens=text_tokens,
                  image_vocab=rows - 1, image_tokens=image_tokens)
    if not overrides:
        cfg = DalleConfig(**shapes)
    else:
        try:
            cfg = DalleConfig(**{**shapes, **overrides})
        except ValueError as e:  # DalleConfig's own checks, e.g. a start token past the embedding
            raise ValueError(f"config.json beside {str(dec_file)!r} does not fit the weights: {e}") from None
    if cfg.image_vocab < cfg.codebook_size:
        raise ValueError(f"{str(dec_file)!r} lm_head.weight has {rows} rows; min-dalle decoders sample the "
                         f"first {cfg.codebook_size} logits and start from token {cfg.start_token}, so they "
                         f"need at least {cfg.codebook_size + 1}")
    return cfg


def load_into(model: torch.nn.Module, sd: dict, file: Path) -> None:
    """Copy `sd` into `model` after checking every key and shape; an error names the key."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            raise ValueError(f"{str(file)!r} lacks {k!r} (shape {tuple(v.shape)}); the file is incomplete "
                             "or not a min-dalle checkpoint")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{str(file)!r}: {k} has shape {tuple(sd[k].shape)} but the architecture "
                             f"inferred from the file needs {tuple(v.shape)}")
    extra = sorted(k for k in sd if k not in own)
    if extra:  # min-dalle itself loads with strict=False
        warnings.warn(f"{str(file)!r}: ignoring {len(extra)} keys that are not weights of the model: "
                      f"{extra[:5]}{' ...' if len(extra) > 5 else ''}", stacklevel=3)
    model.load_state_dict({k: sd[k] for k in own}, strict=True)


def load_dalle_checkpoint(path, variant: str | None = None) -> DalleCheckpoint:
    """Read a min-dalle model folder or models_root (see the module docstring).

    Example
    -------
    >>> ckpt = load_dalle_checkpoint("pretrained", variant="mega")   # doctest: +SKIP
    >>> ckpt.config.decoder_layers, ckpt.detoker                      # doctest: +SKIP
    (24, PosixPath('pretrained/vqgan/detoker.pt'))
    """
    d = find_model_dir(path, variant)
    enc_file, dec_file = _weights(d, "encoder"), _weights(d, "decoder")
    enc, dec = read_state_dict(enc_file), read_state_dict(dec_file)
    config = _read_config(d)
    cfg = infer_config(enc, dec, enc_file, dec_file, config)
    return DalleCheckpoint(cfg, enc, dec, d / "vocab.json", d / "merges.txt", _find_detoker(d, config),
                           config.get("text_cleaning", "min-dalle"))


def build_models(ckpt: DalleCheckpoint) -> tuple[DalleEncoder, DalleDecoder, DalleTokenizer]:
    """Encoder, decoder (fp32, CPU, eval) and tokenizer of a checkpoint, every shape checked."""
    cfg = ckpt.config
    with torch.device("meta"):  # no random init of weights that are overwritten next
        enc, dec = DalleEncoder(cfg), DalleDecoder(cfg)
    enc, dec = enc.to_empty(device="cpu"), dec.to_empty(device="cpu")
    load_into(enc, ckpt.encoder, _weights(ckpt.vocab.parent, "encoder"))
    load_into(dec, ckpt.decoder, _weights(ckpt.vocab.parent, "decoder"))
    tok = DalleTokenizer.from_files(ckpt.vocab, ckpt.merges, text_tokens=cfg.text_tokens,
                                    pad_token=cfg.text_pad_token, cleaning=ckpt.cleaning)
    # Only the specials are checked: BART's vocab.json also lists <mask> (50264), one past mini's
    # 50264 embedding rows, which no prompt can produce.
    top = max(tok.bos, tok.eos, tok.unk)
    if top >= cfg.text_vocab:
        raise ValueError(f"{str(ckpt.vocab)!r} puts <s> / </s> / <unk> at ids up to {top} but the encoder's "
                         f"embed_tokens.weight has {cfg.text_vocab} rows; vocab.json and encoder.pt come "
                         "from different models")
    return enc.eval(), dec.eval(), tok
