"""mmfast.vqgan.model against taming-transformers' own modules (random weights, fp32): encoder
latents, tokens (the chosen code is a nearest one), decoded images, the Gumbel formula, and the
inference layout (channels-last, folded upsamples, bf16 decoder)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmfast.vqgan import VQGAN, VQConfig

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

# small but complete: 3 levels (f4), attention at one level, a width change between levels
TINY = VQConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                z_channels=16, embed_dim=8, n_embed=97)


def _ddconfig(cfg: VQConfig) -> dict:
    return dict(double_z=False, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=3,
                out_ch=3, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=list(cfg.attn_resolutions), dropout=0.0)


class TamingVQ(torch.nn.Module):
    """taming's VQModel at inference, assembled from taming.modules (taming.models needs Lightning)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        dd = _ddconfig(cfg)
        self.encoder = taming_model.Encoder(**dd)
        self.decoder = taming_model.Decoder(**dd)
        self.quantize = taming_quantize.VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        g = torch.Generator().manual_seed(1)
        for p in self.parameters():  # GroupNorm affine and codebook away from their trivial init
            p.data = torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 1 / math.sqrt(p[0].numel()))

    def latents(self, x):
        return self.quant_conv(self.encoder(x))

    def decode_ids(self, ids):
        b, h, w = ids.shape
        z = self.quantize.get_codebook_entry(ids.reshape(-1), (b, h, w, self.quantize.e_dim))
        return self.decoder(self.post_quant_conv(z))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = TamingVQ(TINY).eval()
    ours = VQGAN(TINY).eval()
    ours.load_state_dict(ref.state_dict())
    ours.quantize.refresh()
    return ref, ours


def _check_tokens(latents, codebook, ids):
    """The chosen code is a nearest one (ties may pick either): its distance equals the minimum."""
    z = latents.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1]).double()
    d = torch.cdist(z, codebook.double()).pow(2)
    chosen = d.gather(1, ids.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, d.min(1).values, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layout", ["reference", "prepared"])
@pytest.mark.parametrize("hw", [(32, 32), (16, 48), (4, 4)])
def test_matches_taming(pair, layout, hw):
    ref, ours = pair
    if layout == "prepared":
        ours = copy.deepcopy(ours).prepare(torch.float32)   # channels-last, folded upsamples
    x = torch.rand(2, 3, *hw) * 2 - 1
    with torch.inference_mode():
        want_lat = ref.latents(x)
        got_lat = ours.encode_latents(x)
        torch.testing.assert_close(got_lat, want_lat, atol=1e-4, rtol=1e-4)
        ids = ours.encode(x)
        assert ids.shape == (2, hw[0] // 4, hw[1] // 4) and ids.dtype == torch.int64
        _check_tokens(want_lat, ref.quantize.embedding.weight, ids)
        # taming's own tokens agree except at exact ties
        _, _, (_, _, want_ids) = ref.quantize(want_lat)
        assert (want_ids.reshape(ids.shape) == ids).float().mean() >= 0.99
        torch.testing.assert_close(ours.decode(ids), ref.decode_ids(ids), atol=1e-4, rtol=1e-4)


def test_round_trip_equals_taming_forward(pair):
    """encode -> decode is taming's VQModel.forward (quantize with straight-through is the lookup)."""
    ref, ours = pair
    ours = copy.deepcopy(ours).prepare()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        zq, _, _ = ref.quantize(ref.latents(x))
        want = ref.decoder(ref.post_quant_conv(zq))
        got = ours.decode(ours.encode(x))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_gumbel_quantizer_is_argmax_of_projection():
    """taming 0.0.1 has no GumbelQuantize: the formula of its inference path, written out here."""
    cfg = TINY.replace(quantizer="gumbel", n_embed=50)
    torch.manual_seed(0)
    model = VQGAN(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        h = model.quant_conv(model.encoder(x))
        logits = F.conv2d(h, model.quantize.proj.weight, model.quantize.proj.bias)   # (B, n_embed, h, w)
        want_ids = logits.argmax(dim=1)
        z_q = torch.einsum("bnhw,nd->bdhw", F.one_hot(want_ids, cfg.n_embed).permute(0, 3, 1, 2).float(),
                           model.quantize.embed.weight)
        want_img = model.decoder(model.post_quant_conv(z_q))
        prepared = copy.deepcopy(model).prepare()
        ids = prepared.encode(x)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(prepared.decode(ids), want_img, atol=1e-4, rtol=1e-4)


def test_folded_upsample_is_exact():
    from mmfast.vqgan.model import Upsample
    up = Upsample(32).eval()
    x = torch.randn(2, 32, 7, 5)
    with torch.inference_mode():
        want = up(x)
        up.fold()
        torch.testing.assert_close(up(x), want, atol=1e-5, rtol=1e-5)
        up.to(memory_format=torch.channels_last).fold()
        got = up(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_decoder_keeps_fp32_where_it_matters(pair):
    _, ours = pair
    model = copy.deepcopy(ours).prepare(torch.bfloat16)
    assert model.decoder.conv_in.weight.dtype == torch.bfloat16
    assert model.decoder.conv_out.weight.dtype == torch.float32             # last conv fp32
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    assert model.quantize.embedding.weight.dtype == torch.float32
    ids = torch.randint(0, TINY.n_embed, (2, 8, 8))
    with torch.inference_mode():
        want, got = ours.decode(ids), model.decode(ids)
    assert got.dtype == torch.float32
    mse = ((got.clamp(-1, 1) - want.clamp(-1, 1)) / 2).pow(2).mean()
    assert 10 * torch.log10(1 / mse) > 30     # tiny random model; the runtime's auto bar is 40 dB
