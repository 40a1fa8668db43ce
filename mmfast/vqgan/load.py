"""VQGAN checkpoints as people have them -> (VQConfig, state dict in mmfast.vqgan.model's names).

Layouts understood (nothing is downloaded; pickled code never runs, see `mmfast.io`):
- taming-transformers Lightning `.ckpt` (`state_dict` inside, `loss.*` — LPIPS, discriminator —
  dropped; callback / hyper-parameter objects kept inert), with the run's config when it is beside it:
  `<stem>.yaml` (VQGAN+CLIP notebooks), `model.yaml` or the latest `*-project.yaml` in `configs/` next
  to the file or one folder up (taming's `logs/<run>/checkpoints/last.ckpt` + `logs/<run>/configs/`,
  the released `ckpts/last.ckpt` + `configs/model.yaml`); `GumbelVQ` targets give quantizer="gumbel";
- ru-dalle's `vqgan.gumbelf8-sber.model.ckpt` (a taming GumbelVQ) with `vqgan.gumbelf8-sber.config.yml`;
- min-dalle's `detoker.pt` (decoder only, codebook at top-level `embedding.weight`), alone, in a
  folder, or in min-dalle's models root (`<root>/vqgan/detoker.pt`);
- safetensors / torch files in our (taming's) names.
Without a config, one is inferred from the tensor shapes. Whatever its source, the config is checked
against every tensor before anything is built: errors name the key and both shapes.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..io import read_state_dict
from .config import VQConfig, vq_preset
from .model import VQGAN

_DROPPED_PREFIXES = ("loss.",)  # taming's training loss: LPIPS (a VGG) and the patch discriminator
# bookkeeping that is not inference state: EMAVQ's running codebook statistics, the segmentation colorizer
_DROPPED_KEYS = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg", "colorize")
_SUBTREES = ("first_stage_model.", "model.")  # a VQGAN inside latent-diffusion / ru-dalle wrappers
_GUMBEL_TARGETS = ("GumbelVQ",)
_VQ_TARGETS = ("VQModel", "VQNoDiscModel", "EMAVQ", "VQModelInterface", "VQSegmentationModel")
_WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
ASSUMED_RESOLUTION = 256


def load_vq_checkpoint(path, *, config=None, name: str | None = None) -> tuple[VQConfig, dict[str, torch.Tensor]]:
    """Read a VQGAN checkpoint in any supported layout; see the module docstring.

    Parameters
    ----------
    path : a weights file, or a folder holding one (`detoker.pt`, `vqgan/detoker.pt`, `last.ckpt`,
        `checkpoints/last.ckpt`, `ckpts/last.ckpt`, `*.model.ckpt`, or a single weights file).
    config : a taming / ru-dalle yaml path, or a `VQConfig`; overrides the yaml found beside the file.
    name : a preset (`vq_preset`), e.g. "vqgan-f16-16384", for files that do not say their architecture.

    Returns
    -------
    (VQConfig, dict[str, torch.Tensor]) : the architecture and the weights in `VQGAN`'s names.

    Raises
    ------
    FileNotFoundError : `path` (or `config`) does not exist, or a folder holds no weights file.
    ValueError : not a checkpoint, a pickle that would run code, or a config that does not fit the
        tensors (naming the key and both shapes, or the quantizer kind).

    Examples
    --------
    >>> cfg, sd = load_vq_checkpoint("logs/2021-01-01T00-00-00_imagenet/checkpoints/last.ckpt")
    >>> model = VQGAN(cfg); load_into(model, sd, "last.ckpt")
    """
    if config is not None and name is not None:
        raise ValueError("pass config= (a yaml or VQConfig) or name= (a preset), not both")
    preset = vq_preset(name) if name is not None else None  # a bad name fails before any I/O
    if config is not None and not isinstance(config, (VQConfig, str, os.PathLike)):
        raise TypeError(f"config must be a yaml path or a VQConfig, got {type(config).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VQGAN checkpoint not found: '{path}'")
    weights = _weights_file(path) if path.is_dir() else path
    sd, min_dalle = canonical_state_dict(read_state_dict(weights))
    if preset is not None:
        cfg, origin = preset, f"preset {name!r}"
    elif isinstance(config, VQConfig):
        cfg, origin = config, "the config passed"
    elif config is not None:
        cfg, origin = config_from_yaml(config), f"'{config}'"
    elif min_dalle:
        cfg, origin = infer_config(sd).replace(norm_eps=1e-5, output_range=(0.0, 1.0)), "min-dalle's detokenizer"
    elif (found := _yaml_beside(weights)) is not None:
        cfg, origin = config_from_yaml(found), f"'{found}'"
    else:
        cfg, origin = infer_config(sd), "inferred from the tensor shapes"
    with torch.device("meta"):
        expected = VQGAN(cfg).state_dict()
    check_state_dict(cfg, expected, sd, f"'{weights}'", origin)
    return cfg, sd


def load_into(model: VQGAN, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy `sd` into `model` after checking every key and shape against `model.cfg` (errors name the key)."""
    check_state_dict(model.cfg, model.state_dict(), sd, repr(source), "the model's config")
    model.load_state_dict(sd, strict=True)


def canonical_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Any supported layout -> taming's names; also says whether it was min-dalle's detokenizer."""
    sd = {k: v for k, v in sd.items() if not k.startswith(_DROPPED_PREFIXES) and k not in _DROPPED_KEYS}
    if not any(k.startswith(("encoder.", "decoder.")) for k in sd):
        for prefix in _SUBTREES:
            if any(k.startswith(prefix + "decoder.") for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                break
    min_dalle = "embedding.weight" in sd and not any(k.startswith("quantize.") for k in sd)
    if min_dalle:  # VQGanDetokenizer: the codebook sits at the top level
        sd = {("quantize.embedding.weight" if k == "embedding.weight" else k): v for k, v in sd.items()}
    return sd, min_dalle


def config_from_yaml(path) -> VQConfig:
    """A taming / ru-dalle / latent-diffusion VQ model yaml (`model.target`, `model.params.{ddconfig,
    embed_dim, n_embed}`) -> VQConfig, read with `yaml.safe_load`."""
    try:
        import yaml
    except ImportError:
        raise ImportError("reading VQGAN yaml configs needs PyYAML: pip install pyyaml") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN config not found: '{path}'")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"'{path}' is not a readable YAML file: {e}") from e
    model = raw.get("model", raw) if isinstance(raw, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    dd = params.get("ddconfig") if isinstance(params, dict) else None
    if not isinstance(dd, dict):
        raise ValueError(f"'{path}' has no model.params.ddconfig: not a taming VQGAN config")
    target = str(model.get("target") or "")
    kind = target.rsplit(".", 1)[-1]
    if kind in _GUMBEL_TARGETS:
        quantizer = "gumbel"
    elif kind in _VQ_TARGETS or not target:
        quantizer = "vq"
    else:
        raise ValueError(f"'{path}': model.target is {target!r}, not a VQGAN "
                         f"({', '.join(_VQ_TARGETS + _GUMBEL_TARGETS)})")
    if dd.get("double_z"):
        raise ValueError(f"'{path}': model.params.ddconfig.double_z is true: a KL autoencoder, not a VQGAN")
    if params.get("remap"):
        raise ValueError(f"'{path}': model.params.remap={params['remap']!r} (re-indexed codebooks) is not supported")

    def get(where: dict, key: str, prefix: str, default=None):
        if key not in where and default is None:
            raise ValueError(f"'{path}' has no {prefix}.{key}")
        return where.get(key, default)

    dd_, p_ = "model.params.ddconfig", "model.params"
    try:
        return VQConfig(
            resolution=int(get(dd, "resolution", dd_, ASSUMED_RESOLUTION)),
            in_channels=int(get(dd, "in_channels", dd_, 3)), out_ch=int(get(dd, "out_ch", dd_, 3)),
            ch=int(get(dd, "ch", dd_)),
            ch_mult=tuple(int(m) for m in get(dd, "ch_mult", dd_)),
            num_res_blocks=int(get(dd, "num_res_blocks", dd_)),
            attn_resolutions=tuple(int(r) for r in get(dd, "attn_resolutions", dd_, ())),
            z_channels=int(get(dd, "z_channels", dd_)), embed_dim=int(get(params, "embed_dim", p_)),
            n_embed=int(get(params, "n_embed", p_)), quantizer=quantizer)
    except (TypeError, ValueError) as e:
        raise ValueError(f"'{path}' is not a usable VQGAN config: {e}") from e


def infer_config(sd: dict[str, torch.Tensor]) -> VQConfig:
    """The architecture from taming-named tensor shapes.

    Level widths give `ch` (encoder.conv_in's output, or their common divisor when there is no encoder)
    and `ch_mult`; block counts give `num_res_blocks`; the levels holding `attn` blocks give
    `attn_resolutions`, taken at an assumed `resolution` of 256 (the training size is not stored in the
    weights; any resolution with attention at the same levels is the same network: only the default
    input size differs). GroupNorm eps is taming's 1e-6.
    """
    has_encoder = "encoder.conv_in.weight" in sd
    gumbel = "quantize.proj.weight" in sd
    codebook = "quantize.embed.weight" if gumbel else "quantize.embedding.weight"
    need = ["decoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight", codebook]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a VQGAN state dict (taming names): missing {missing}")
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.up.")})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"not a VQGAN state dict: decoder.up levels are {levels}")
    widths = [_shape(sd, f"decoder.up.{i}.block.0.conv2.weight")[0] for i in levels]
    ch = _shape(sd, "encoder.conv_in.weight")[0] if has_encoder else math.gcd(*widths)
    if any(w % ch for w in widths):
        raise ValueError(f"decoder level widths {widths} are not multiples of encoder.conv_in's {ch} channels")
    blocks = len({k.split(".")[4] for k in sd if k.startswith("decoder.up.0.block.")})
    attn = [i for i in levels if f"decoder.up.{i}.attn.0.q.weight" in sd]
    return VQConfig(
        resolution=ASSUMED_RESOLUTION,
        in_channels=_shape(sd, "encoder.conv_in.weight")[1] if has_encoder else 3,
        out_ch=_shape(sd, "decoder.conv_out.weight")[0], ch=ch, ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=blocks - 1, attn_resolutions=tuple(ASSUMED_RESOLUTION >> i for i in attn),
        z_channels=_shape(sd, "decoder.conv_in.weight")[1], embed_dim=_shape(sd, "post_quant_conv.weight")[1],
        n_embed=_shape(sd, codebook)[0], quantizer="gumbel" if gumbel else "vq", has_encoder=has_encoder)


def check_state_dict(cfg: VQConfig, expected: dict, sd: dict, source: str, origin: str) -> None:
    """Raise ValueError unless `sd` has exactly `expected`'s keys and shapes (the model of `cfg`)."""
    if "quantize.proj.weight" in sd and cfg.quantizer != "gumbel":
        raise ValueError(f"checkpoint {source} has a Gumbel quantizer (quantize.proj.weight) but config says "
                         f"quantizer={cfg.quantizer!r} ({origin}); use a Gumbel config (e.g. name='gumbel-f8-8192') "
                         "or no name / config to infer it")
    if "quantize.embedding.weight" in sd and cfg.quantizer != "vq":
        raise ValueError(f"checkpoint {source} has a VQ quantizer (quantize.embedding.weight) but config says "
                         f"quantizer={cfg.quantizer!r} ({origin}); use a VQ config (e.g. name='vqgan-f16-16384') "
                         "or no name / config to infer it")
    file_has_encoder = any(k.startswith("encoder.") for k in sd)
    if file_has_encoder != cfg.has_encoder:
        what = ("has encoder.* weights" if file_has_encoder
                else "has no encoder (decoder only, as min-dalle's detoker.pt)")
        raise ValueError(f"checkpoint {source} {what} but config says has_encoder={cfg.has_encoder} ({origin})")
    wrong = [k for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"checkpoint {source} does not fit the config ({origin}): {k} has shape {tuple(sd[k].shape)} "
                         f"in the checkpoint but {tuple(expected[k].shape)} in the config"
                         f"{f' ({len(wrong) - 1} more keys differ)' if len(wrong) > 1 else ''}; "
                         "is it for another preset or config?")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"checkpoint {source} does not fit the config ({origin}): missing keys {_few(missing)}, "
                         f"unexpected keys {_few(unexpected)}")


def _few(keys: list[str]) -> str:
    return f"{keys[:8]}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''}"


def _shape(sd: dict, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"not a VQGAN state dict (taming names): missing {key}")
    return tuple(sd[key].shape)


def _weights_file(folder: Path) -> Path:
    for rel in ("detoker.pt", "vqgan/detoker.pt", "last.ckpt", "checkpoints/last.ckpt", "ckpts/last.ckpt"):
        if (folder / rel).is_file():
            return folder / rel
    for sub in (folder, folder / "checkpoints", folder / "ckpts"):
        found = sorted(sub.glob("*.model.ckpt")) or \
            sorted(p for p in sub.glob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"'{sub}' holds several weight files ({[p.name for p in found]}); pass one of them")
    raise FileNotFoundError(f"'{folder}' holds no VQGAN weights (detoker.pt, vqgan/detoker.pt, last.ckpt, "
                            f"checkpoints/last.ckpt, ckpts/last.ckpt or one {'/'.join(_WEIGHT_SUFFIXES)} file)")


def _yaml_beside(weights: Path) -> Path | None:
    """The run's config next to a checkpoint, in the layouts listed in the module docstring."""
    d = weights.parent
    base = weights.name[:-len(".model.ckpt")] if weights.name.endswith(".model.ckpt") else weights.stem
    for p in (d / f"{base}.config.yml", d / f"{base}.config.yaml", d / f"{base}.yaml", d / f"{base}.yml",
              d / "model.yaml", d / "configs" / "model.yaml", d.parent / "configs" / "model.yaml"):
        if p.is_file():
            return p
    for configs in (d / "configs", d.parent / "configs"):
        runs = sorted(configs.glob("*-project.yaml"))  # dated names: the last one is the latest (resumed) run
        if runs:
            return runs[-1]
    return None
