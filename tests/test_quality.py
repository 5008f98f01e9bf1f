"""The FP8 quality gate, `python -m bench.quality` (README "Quality: how far FP8 is from bf16"): the README's smoke
command runs and every row of it stays within the bounds; the tiny checkpoint's FP8 latents, loaded as a
`dit.quantize=fp8` run loads them, differ from bf16's and stay within them too; a quantizer that drops its scales
breaks every bound (the negative control).

The bounds live in one place, bench.quality.BOUNDS; the README quotes `bounds_text()` word for word (checked
here), so the figures the README promises and the ones this file holds cannot drift apart.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import quality
from readme_commands import readme_command

ROOT = Path(__file__).resolve().parents[1]
MUST_DIFFER = 1e-3  # FP8 changes the latents: a relative error below this means nothing was quantized


def _quality_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Quality: how far FP8 is from bf16")
    return text[start:text.index("\n## ", start)]


@pytest.fixture
def smoke(tmp_path_factory, tiny_cache):
    """The README's CI command, run as a user runs it, with --json."""
    out = tmp_path_factory.mktemp("quality") / "smoke.json"
    words = shlex.split(readme_command("python -m bench.quality --size smoke").text)
    env = dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *words[1:], "--json", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_readme_quotes_the_bounds_the_test_holds():
    section = _quality_section()
    assert quality.bounds_text() in section
    assert f"at least {quality.SKIP_RULE:g}x its even share" in section


def test_the_smoke_run_differs_from_bf16_within_the_bounds_and_picks_the_default_skip(smoke):
    """Every row of the README's smoke command. (The one test that takes the run: under xdist's default
    distribution a second one would run it again, on another worker.)"""
    from launch.config import DiTConfig

    # SKIP_RULE on the smoke rows picks dit.fp8_skip's default (README "Quality": decided on the mid figures).
    assert smoke["settings"]["fp8_skip_choice"] == quality.skip_label(DiTConfig().fp8_skip)
    rows = smoke["tables"][0]["rows"]
    skips = [quality.skip_label(s) for s in quality.parse_skips(quality.DEFAULT_SKIPS)]
    assert [(r["init"], r["fp8_skip"]) for r in rows] == [(i, s) for i in quality.INITS for s in skips]
    for row in rows:
        assert quality.bound_failures(row) == [], row
        assert row["latents_rel_err"] > MUST_DIFFER and row["max_abs_diff"] > 0, row
        # Step 1 runs both DiTs on the same latent: its two errors are one figure.
        assert row["dit_rel_err"][0] == row["dit_rel_err_trajectory"][0]
    for init in quality.INITS:
        by_skip = {r["fp8_skip"]: r for r in rows if r["init"] == init}
        # Three of four blocks in bf16 leave less error on the same inputs than none: the skip takes effect.
        assert max(by_skip["0,1,-1"]["dit_rel_err"]) < min(by_skip["none"]["dit_rel_err"])


def test_the_convert_default_is_the_configs_fp8_skip(monkeypatch):
    """parallel.convert's --fp8-skip default is dit.fp8_skip's (launch/config.py): a converted file is the one a
    default run reads."""
    import parallel.convert
    from launch.config import DiTConfig

    calls = []
    monkeypatch.setattr(parallel.convert, "convert", lambda *args: calls.append(args))
    parallel.convert.main(["x.pt", "--quantize", "fp8"])
    (args,) = calls
    assert quality.skip_label(args[4]) == quality.skip_label(DiTConfig().fp8_skip)


def test_the_tiny_checkpoints_fp8_latents_differ_from_bf16_within_the_bounds(tiny_weights, tmp_path):
    """Done-when of the FP8 work: the tiny model's FP8 latents (its checkpoint loaded by load_dit(quantize="fp8"),
    as a run does) are not bf16's, and stay within the README's bounds."""
    data = quality.main(["--size", "tiny", "--weights", str(tiny_weights), "--skips", "none",
                         "--json", str(tmp_path / "tiny.json")])
    (row,) = data["tables"][1]["rows"]
    assert row["init"] == "checkpoint" and quality.bound_failures(row) == [], row
    assert row["latents_rel_err"] > MUST_DIFFER, row


def _without_scales(matrix):
    """quantize_rows broken: values cast to e4m3 as they are (clipped to ±448), every scale 1."""
    from k4flash.fp8 import FP8, FP8_MAX

    wide = matrix.float()
    return wide.clamp(-FP8_MAX, FP8_MAX).to(FP8), torch.ones(wide.shape[0], device=wide.device)


def test_a_quantizer_without_scales_breaks_every_bound(monkeypatch, tiny_cache):
    import k4flash.fp8

    monkeypatch.setenv("K4FLASH_CACHE", str(tiny_cache))
    monkeypatch.setattr(k4flash.fp8, "quantize_rows", _without_scales)
    data = quality.main(["--size", "smoke", "--skips", "none", "--inits", "outliers"])
    (row,) = data["tables"][1]["rows"]
    assert quality.bound_failures(row) == list(quality.BOUNDS), row
