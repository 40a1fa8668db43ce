"""Fuzz the command line: `mmfast.cli.main([...])` in-process with drawn arguments, and a few real runs.

Documented ends of a run: success (exit 0 / None), argparse's usage error (SystemExit 2, its message on
stderr), or mmfast's one-line error (SystemExit with "mmfast <command>: ..."). Any exception escaping
main() is bad. Successful runs must have written their output (tokens of the right shape, a PNG grid,
embeddings of unit norm).
"""
import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from mmfast.cli import main
from tests.fuzz import models as M
from tests.fuzz.oracle import run_case


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model folders, images (good and hostile) and junk files the arguments are drawn from."""
    d = tmp_path_factory.mktemp("fuzz_cli")
    clip = M.write_clip_dir(d / "clip", M.tiny_clip(M.CLI_CLIP_CFG))
    vq = M.write_vq_run(d / "vq", M.tiny_vq())
    dalle = M.write_dalle_dir(d / "dalle_bart_mini", *M.tiny_dalle())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(d / "b.jpg")
    (d / "trunc.png").write_bytes((d / "a.png").read_bytes()[:60])
    (d / "junk.bin").write_bytes(b"\x00\xff" * 40)
    (d / "texts.txt").write_text("a cat\nкошка\n\n")
    (d / "bad_texts.txt").write_bytes(b"\xff\xfe\x00a")
    np.save(d / "tokens.npy", rng.integers(0, 64, (3, 4, 4)))
    np.save(d / "bad_tokens.npy", np.full((1, 4, 4), 1000))
    np.save(d / "float_tokens.npy", np.zeros((1, 16), np.float32))
    np.save(d / "object.npy", np.array([object()]), allow_pickle=True)
    (d / "outdir.npy").mkdir()
    os.environ["MMFAST_BACKEND"] = "torch"  # the default "auto" probes ONNX Runtime: minutes per model
    return d, {"clip": clip, "vq": vq, "dalle": dalle}


def _args(draw, d, models):
    path = lambda *good: draw(st.sampled_from([*map(str, good)] * 3 + [str(d / "missing"), str(d), str(d / "junk.bin"), ""]))  # noqa: E731
    images = lambda: draw(st.lists(st.sampled_from([str(d / "a.png")] * 3 + [str(d / "b.jpg"), str(d / "trunc.png"),  # noqa: E731
                                                                        str(d / "junk.bin"), str(d / "missing.png"), str(d)]),
                                   min_size=1, max_size=3))
    out = lambda *suffixes: str(d / "out" / draw(st.sampled_from([f"o{s}" for s in suffixes] * 3 + ["o.txt", "outdir.npy"])))  # noqa: E731
    dtype = lambda: draw(st.sampled_from(["fp32"] * 4 + ["auto", "bf16", "int8", "fp16", "fp64", ""]))  # noqa: E731
    device = lambda: draw(st.sampled_from(["cpu"] * 6 + ["cuda", "tpu", "cuda:7", "", "meta"]))  # noqa: E731
    cmd = draw(st.sampled_from(["info", "classify", "embed", "embed", "vq encode", "vq decode", "generate", "export",
                                "junk"]))
    if cmd == "info":
        return ["info"] + draw(st.sampled_from([[], [path(models["clip"]), "--dtype", dtype(), "--device", device()]]))
    if cmd == "classify":
        return ["classify", path(models["clip"]), *images(), "--labels",
                draw(st.sampled_from(["cat,dog", "cat", ",,,", "", "кошка,собака"])), "--top",
                draw(st.sampled_from(["1", "5", "0", "-1", "x"])), "--dtype", dtype(), "--device", device(),
                *draw(st.sampled_from([[], ["--json"], ["--template", "a {}"], ["--template", "no braces"]]))]
    if cmd == "embed":
        what = draw(st.sampled_from([["--images", *images()], ["--texts", "a cat", ""], ["--texts-file",
                                     str(d / draw(st.sampled_from(["texts.txt", "bad_texts.txt", "missing.txt"])))],
                                     [], ["--images", str(d / "a.png"), "--texts", "x"]]))
        return ["embed", path(models["clip"]), *what, "-o", out(".npy", ".safetensors"), "--dtype", dtype(),
                "--device", device()]
    if cmd == "vq encode":
        return ["vq", "encode", "--model", path(models["vq"]), *images(), "--size",
                draw(st.sampled_from(["16", "16", "8", "17", "0", "-16", "x"])), "-o", out(".npy"), "--dtype",
                draw(st.sampled_from(["fp32"] * 3 + ["bf16", "fp16", "int8"])), "--device", device()]
    if cmd == "vq decode":
        tok = draw(st.sampled_from(["tokens.npy"] * 3 + ["bad_tokens.npy", "float_tokens.npy", "object.npy",
                                                        "junk.bin", "missing.npy"]))
        return ["vq", "decode", "--model", path(models["vq"]), str(d / tok), "-o", out(".png", ".jpg"),
                "--columns", draw(st.sampled_from(["0", "2", "-3", "x"])), "--dtype", "fp32", "--device", device()]
    if cmd == "generate":
        return ["generate", *draw(st.sampled_from([["a cat"], ["a cat", "a dog"], [""], ["кошка"]])), "--model",
                path(models["dalle"]), "--vqgan", draw(st.sampled_from(["none", str(d / "junk.bin"), str(d / "missing")])),
                "-n", draw(st.sampled_from(["1", "2", "0", "-1", "x"])), "--seed", draw(st.sampled_from(["0", "-5", "x"])),
                "--top-k", draw(st.sampled_from(["4", "0", "99999"])), "--temperature",
                draw(st.sampled_from(["1", "0", "nan", "-1"])), "--out", out(".png"), "--dtype", dtype(),
                "--device", device()]
    if cmd == "export":
        return ["export", draw(st.sampled_from(["onnx", "triton-repo", "tflite"])), str(d / "missing"), "--out",
                str(d / "export_out"), *draw(st.sampled_from([[], ["--family", "clip"], ["--family", "x"]]))]
    return draw(st.lists(st.sampled_from(["--help", "-h", "x", "", "info", "--dtype", "fp32", "vq", "--", "-"]),
                         max_size=4))


def _documented_exit(e: SystemExit) -> bool:
    return e.code in (0, None, 2) or (isinstance(e.code, str) and e.code.startswith("mmfast"))


@given(data=st.data())
def test_cli_in_process(world, data):
    d, models = world
    argv = _args(data.draw, d, models)
    data.draw(st.just(argv), label="argv")  # printed with a failing case
    (d / "out").mkdir(exist_ok=True)
    for f in (d / "out").iterdir():
        f.unlink()

    def run():
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
            main(argv)
        return out.getvalue()

    def check(stdout):
        written = list((d / "out").iterdir())
        if argv[:2] == ["vq", "encode"] or argv[:1] == ["embed"]:
            assert len(written) == 1, f"{argv}: no output file"
            if written[0].suffix == ".npy":
                a = np.load(written[0])
                if argv[0] == "embed":
                    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5), "embeddings are not unit-norm"
                else:
                    assert a.shape[1:] == (int(argv[argv.index("--size") + 1]) // 2,) * 2, f"tokens {a.shape}"
        if argv[:2] == ["vq", "decode"] or argv[:1] == ["generate"]:
            assert len(written) == 1 and Image.open(written[0]).size[0] > 0, f"{argv}: no image grid"

    run_case("cli.main", run, names=["mmfast"], check=check, allow=[(SystemExit, _documented_exit)])


@pytest.mark.parametrize("argv, code", [(["info"], 0), (["embed", "MISSING", "--texts", "a", "-o", "x.npy"], 1),
                                        (["vq", "decode"], 2), (["--bogus"], 2)])
def test_cli_real_process(world, argv, code):
    """A few real `python -m mmfast` runs: exit codes, one-line errors, no traceback."""
    d, _ = world
    argv = [str(d / "missing") if a == "MISSING" else a for a in argv]
    env = {**os.environ, "MMFAST_BACKEND": "torch"}
    p = subprocess.run([sys.executable, "-m", "mmfast", *argv], capture_output=True, text=True, timeout=120,
                       cwd=d, env=env)
    assert p.returncode == code, (p.returncode, p.stderr[-500:])
    assert "Traceback" not in p.stderr
    if code:
        assert p.stderr.strip(), "an error exit says why"


def test_cli_classify_negative_top(world):
    d, models = world
    argv = ["classify", str(models["clip"]), str(d / "a.png"), "--labels", "cat,dog", "--top", "-1", "--dtype", "fp32",
            "--device", "cpu"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_case("cli.main (classify --top -1)", lambda: main(argv), names=["mmfast"],
                 allow=[(SystemExit, _documented_exit)])


@given(device=st.sampled_from(["cuda", "tpu", "", "meta", "cuda:7"]))
def test_cli_generate_device(world, device):
    d, models = world
    argv = ["generate", "a cat", "--model", str(models["dalle"]), "--vqgan", "none", "--device", device, "--out",
            str(d / "out" / "g.png")]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_case("cli.main (generate --device)", lambda: main(argv), names=["mmfast"],
                 allow=[(SystemExit, _documented_exit)])
