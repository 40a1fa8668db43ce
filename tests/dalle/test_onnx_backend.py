"""DALL·E on ONNX Runtime: the exported text encoder and decode step against PyTorch at batch 1 and 5,
the graphs' checks, the KV cache written in place, and generation through backend="onnxruntime" /
"auto" giving PyTorch's tokens (tiny min-dalle fixture from conftest)."""
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mmfast.dalle import load_generator  # noqa: E402
from mmfast.export.onnx import export_generator  # noqa: E402
from mmfast.export.onnx_common import as_numpy, ort_session  # noqa: E402
from mmfast.export.onnx_dalle import dalle_modules, step_inputs, torch_step  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse", "the cat's hat is red"]


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("MMFAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mmfast-cache"))


@pytest.fixture(scope="module")
def graphs(tiny, tmp_path_factory):
    return export_generator(tiny[0], tmp_path_factory.mktemp("dalle_onnx"), parts=("encoder", "step", "step_logits"))


@pytest.mark.parametrize("B", [1, 5])
def test_encoder_and_step_match_torch(tiny, graphs, B):
    enc, dec = dalle_modules(tiny[0])
    text = torch.randint(4, 400, (B, 64))
    text[:, 7:] = 1                                                          # <pad> after 7 tokens
    with torch.no_grad():
        want = enc(text)
    got = ort_session(graphs["encoder"], threads=1).run(None, {"text": text.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0)
    for part in ("step", "step_logits"):
        s = ort_session(graphs[part], threads=1)
        names, outs = [i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]
        for pos in (0, 9, 255):
            feeds = step_inputs(dec, B, pos, seed=B + pos)
            want = torch_step(dec, feeds, sample=part == "step")
            got = dict(zip(outs, s.run(None, {k: as_numpy(feeds[k]) for k in names})))
            torch.testing.assert_close(torch.from_numpy(got["logits"]), want["logits"], atol=1e-4, rtol=0)
            for c in ("k_cache_out", "v_cache_out"):
                torch.testing.assert_close(torch.from_numpy(got[c]), want[c], atol=1e-5, rtol=0)
            if part == "step":
                assert torch.equal(torch.from_numpy(got["tokens"]), want["tokens"]), (B, pos)


def test_graphs_check_with_symbolic_batch(graphs):
    for part, path in graphs.items():
        onnx.checker.check_model(str(path), full_check=True)
        m = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
        assert {o.domain: o.version for o in m.opset_import}[""] == (18 if part == "step" else 17)
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
        if part == "encoder":
            assert dims == {"text": ["batch", 64]}
            continue
        assert dims["prev"] == ["batch"] and dims["pos"] == [] and dims["cross_len"] == ["rows"]
        assert dims["k_cache"] == [2, "rows", 2, 256, 64]                     # dalle-tiny: 2 layers, 2 heads
        if part == "step":
            assert dims["seeds"] == dims["top_k"] == ["batch"] and dims["max_top_k"] == []


def test_generation_on_onnxruntime_gives_torch_tokens(tiny):
    ref = load_generator(tiny[0], device="cpu", dtype="fp32", vqgan=None)
    gen = load_generator(tiny[0], device="cpu", backend="onnxruntime", vqgan=None)
    assert gen.backend == "onnxruntime" and gen.info["step"]["backend"] == "onnxruntime"
    want = ref.generate_tokens(PROMPTS, n=2, seed=0, top_k=1)
    assert torch.equal(gen.generate_tokens(PROMPTS, n=2, seed=0, top_k=1), want)
    assert torch.equal(gen.generate_tokens(PROMPTS, n=2, seed=0, top_k=1, batch_size=3), want)
    # sampled: the same counter-based noise inside the graph, the same tokens
    kw = dict(n=2, seed=7, top_k=64, top_p=0.9, temperature=0.8, guidance=4.0)
    assert torch.equal(gen.generate_tokens(PROMPTS, **kw), ref.generate_tokens(PROMPTS, **kw))


def test_the_step_writes_the_cache_in_place(tiny):
    gen = load_generator(tiny[0], device="cpu", backend="onnxruntime", vqgan=None)
    dec, cfg = gen.decoder, gen.config
    text = gen.tokenizer(PROMPTS[:1]).flatten(0, 1)
    ck, cv, cl = dec.cross_kv(gen.encoder(text), text)
    k, v = dec.new_cache(2)
    ptr = k.data_ptr()
    one = lambda x, t: torch.full((1,), x, dtype=t)  # noqa: E731
    params = (one(1.0, torch.float32), one(1, torch.long), one(1.0, torch.float32), one(16.0, torch.float32))
    prev = one(cfg.start_token, torch.long)
    for i in range(3):
        prev = gen.decode_step(dec, prev, torch.tensor(i), k, v, ck, cv, cl, one(0, torch.long), *params, max_top_k=1)
    assert k.data_ptr() == ptr and len(dec._bound) == 1                      # one binding for the batch
    assert k[:, :, :, :3].abs().sum(-1).min() > 0 and k[:, :, :, 3:].abs().max() == 0   # positions 0..2 only


def test_auto_and_int8_backends(tiny):
    ref = load_generator(tiny[0], device="cpu", dtype="fp32", vqgan=None)
    auto = load_generator(tiny[0], device="cpu", backend="auto", vqgan=None)
    assert auto.backend.startswith("auto: encoder ") and set(auto.info) == {"encoder", "step"}
    for i in auto.info.values():
        assert "fastest of" in i["why"] and set(i["times_ms"]) == {"torch", "onnxruntime fp32"}
    assert auto.info["step"]["fidelity"]["onnxruntime fp32"] is True        # greedy tokens equal fp32's
    want = ref.generate_tokens(PROMPTS[:1], n=1, seed=0, top_k=1)
    assert torch.equal(auto.generate_tokens(PROMPTS[:1], n=1, seed=0, top_k=1), want)
    q = load_generator(tiny[0], device="cpu", backend="onnxruntime", dtype="int8", vqgan=None)
    assert q.info["step"]["dtype"] == "int8"
    t = q.generate_tokens(PROMPTS[:1], n=1, seed=0, top_k=1)
    assert t.shape == want.shape and 0 <= int(t.min()) and int(t.max()) < 2 ** 14


def test_bad_input(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown part.*valid parts: encoder, step, step_logits"):
        export_generator(tiny[0], tmp_path, parts=("decoder",))
    with pytest.raises(ValueError, match="bf16 has no ONNX Runtime CPU kernels"):
        load_generator(tiny[0], device="cpu", backend="onnxruntime", dtype="bf16", vqgan=None)
    with pytest.raises(ValueError, match="backend='tensorrt' is not offered for the generator"):
        load_generator(tiny[0], device="cpu", backend="tensorrt", vqgan=None)
    with pytest.raises(ValueError, match="pass the checkpoint path"):              # bf16 weights
        export_generator(load_generator(tiny[0], device="cpu", dtype="bf16", vqgan=None), tmp_path)
    enc, dec = dalle_modules(tiny[0])
    if hasattr(dec, "pack_weights"):                                             # the CPU step's packed linears
        with pytest.raises(ValueError, match="pass the checkpoint path"):
            export_generator((enc, dec.pack_weights("int8")), tmp_path)
