"""`mmfast demo`: the README's first command, end to end on the shipped demo models."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from mmfast.cli import main
from mmfast.demo.run import DEFAULT_PROMPTS, run


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("MMFAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mmfast-cache"))


def test_demo_report_and_grid(tmp_path):
    lines = []
    report = run(out=tmp_path / "grid.png", n=2, seed=0, backend="torch", print_fn=lines.append)
    png = Image.open(tmp_path / "grid.png")
    assert png.format == "PNG" and png.width > 2 * 128 and png.height > len(DEFAULT_PROMPTS) * 128
    assert report["prompts"] == list(DEFAULT_PROMPTS) and any("синий" in p for p in report["prompts"])
    assert [g["prompt"] for g in report["generated"]] == report["prompts"]
    assert min(report["zero_shot_accuracy"].values()) >= 0.9
    assert all(len(r["top"]) == 3 for r in report["search"])
    assert set(report["timings_s"]) >= {"load", "generate", "zero_shot", "search", "total"}
    assert any("zero-shot" in line for line in lines) and any("search" in line for line in lines)
    assert not [p for p in tmp_path.iterdir() if p.name != "grid.png"]          # no temp file left


def test_cli_demo_any_prompt_json(tmp_path, capsys):
    main(["demo", "--prompt", "синий квадрат справа", "--prompt", "a yellow star", "-n", "1",
          "--out", str(tmp_path / "d.png"), "--backend", "torch", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == ["синий квадрат справа", "a yellow star"]
    assert (tmp_path / "d.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--out", "x.jpg"], "out must end in .png"),
    (["-n", "0"], "n must be an int in 1..16"),
    (["--prompt", "  "], "every prompt must be a non-empty string"),
])
def test_cli_demo_bad_input(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        main(["demo", "--backend", "torch", *args])


def test_mmfast_demo_exits_0_and_writes_its_png(tmp_path):
    """The installed command, in a fresh process, with the default backend (auto)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MMFAST_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "mmfast", "demo", "-n", "2", "--out", str(tmp_path / "demo.png")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "demo.png").is_file() and "done in" in r.stdout
