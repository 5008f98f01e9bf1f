"""End to end on the tiny model: the model card's call, seed determinism, outputs, bad input."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from k4flash import get_T2V_pipeline
from k4flash.tiny import TINY_DIT_PARAMS
from k4flash.outputs import read_mp4_frames

from parity import assert_parity

PROMPT = "a red square slides over a blue floor"


@pytest.fixture(scope="module")
def pipe(tiny_weights):
    return get_T2V_pipeline("cpu", cache_dir=tiny_weights, dit_params=TINY_DIT_PARAMS, download=False)


def test_model_card_call_with_explicit_paths(tiny_weights, tmp_path):
    pipe = get_T2V_pipeline(
        {"dit": "cpu", "vae": "cpu", "text_embedder": "cpu"}, resolution=512, cache_dir=str(tmp_path / "unused"),
        dit_path=str(tiny_weights / "kandinsky4_distil_512.pt"), text_encoder_path=str(tiny_weights / "text_encoder"),
        tokenizer_path=str(tiny_weights / "tokenizer"), vae_path=str(tiny_weights / "vae"),
        scheduler_path=str(tiny_weights / "scheduler"), conf_path=None, dit_params=TINY_DIT_PARAMS)
    save_path = tmp_path / "test.mp4"
    pipe(text=PROMPT, save_path=str(save_path), bs=1, time_length=1, width=672, height=384, seed=42,
         return_frames=False)
    frames = read_mp4_frames(save_path)
    assert frames.shape == (9, 384, 672, 3)  # 4·(F−1)+1 frames, F = 3
    sidecar = json.loads(save_path.with_suffix(".json").read_text())
    assert sidecar["seed"] == 42 and sidecar["prompt"] == PROMPT and sidecar["video_frames"] == 9
    assert set(sidecar["timings"]) >= {"text_encode_s", "denoise_s", "decode_s", "write_s"}
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def _official_conf(tiny_weights, tmp_path, tokens=224):
    conf = tmp_path / "conf.yaml"
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_DIT_PARAMS.items()}
    conf.write_text(json.dumps({  # JSON is YAML
        "dit": {"params": params, "checkpoint_path": str(tiny_weights / "kandinsky4_distil_512.pt"),
                "scheduler": str(tiny_weights / "scheduler")},
        "vae": {"checkpoint_path": str(tiny_weights / "vae")},
        "text_embedder": {"emb_size": 32, "tokens_lenght": tokens,
                          "params": {"checkpoint_path": str(tiny_weights / "text_encoder"),
                                     "tokenizer_path": str(tiny_weights / "tokenizer")}},
        "resolution": 512}))
    return conf


def test_official_conf_yaml(tiny_weights, tmp_path):
    conf = _official_conf(tiny_weights, tmp_path)
    pipe = get_T2V_pipeline("cpu", conf_path=str(conf), cache_dir=str(tmp_path / "none"), download=False)
    images = pipe(text=PROMPT, time_length=0, width=512, height=512, seed=1)
    assert len(images) == 1 and images[0].size == (512, 512)


def test_a_receiving_rank_sizes_the_text_embedding_from_the_configured_length(tiny_weights, tmp_path):
    """The conf's tokens_lenght sizes the embedding the group main encodes and the buffer the other ranks
    receive it into: a broadcast does not check sizes, so a mismatch would be garbage or a hang."""
    from k4flash.pipeline import Role, load_pipeline

    class Receiver(Role):  # a group's other rank, with the broadcast left out
        is_group_main = False
        loads_vae = False

    conf = str(_official_conf(tiny_weights, tmp_path, tokens=77))
    main = load_pipeline("cpu", conf_path=conf, cache_dir=str(tmp_path / "none"), download=False)
    other = load_pipeline("cpu", conf_path=conf, cache_dir=str(tmp_path / "none"), download=False, role=Receiver())
    assert other.text_encoder is None
    sent, received = main.encode_text(PROMPT), other.encode_text(PROMPT)
    assert (tuple(sent.shape), tuple(received.shape)) == ((1, 77, 32), (1, 77, 32))
    assert main.text_tokens == other.text_tokens == 77
    with pytest.raises(ValueError, match="77"):
        main.encode_text(PROMPT, text_embed=torch.zeros(1, 224, 32))


def test_same_seed_same_video_other_seed_other_video(pipe):
    a = pipe.generate(PROMPT, time_length=1, width=512, height=512, seed=5, progress=False)
    b = pipe.generate(PROMPT, time_length=1, width=512, height=512, seed=5, progress=False)
    other_seed = pipe.denoise(pipe.encode_text(PROMPT), (3, 64, 64, 16), seed=6, progress=False)
    assert a.latents.shape == (3, 64, 64, 16) and a.latents.dtype == torch.float32
    assert_parity(a.latents, b.latents, atol=0, what="latents")
    assert_parity(a.frames, b.frames, atol=0, what="frames")
    assert (a.latents - other_seed).abs().mean() > 0.1
    assert a.frames.shape == (9, 512, 512, 3) and a.frames.dtype == torch.uint8


def test_prompt_changes_the_video(pipe):
    a = pipe.generate(PROMPT, time_length=0, width=512, height=512, seed=5, progress=False)
    b = pipe.generate("a completely different prompt", time_length=0, width=512, height=512, seed=5, progress=False)
    assert (a.latents - b.latents).abs().max() > 1e-3


def test_return_frames_gives_pil_frames(pipe):
    frames = pipe(text=PROMPT, time_length=1, width=736, height=352, seed=3, return_frames=True)
    assert len(frames) == 9 and frames[0].size == (736, 352)
    # The video itself, frame by frame, not just its count and size.
    expected = pipe.generate(PROMPT, time_length=1, width=736, height=352, seed=3, progress=False).frames
    assert torch.equal(torch.stack([torch.from_numpy(np.asarray(f)) for f in frames]), expected)
    assert expected.float().std() > 10


def test_save_latents_and_image_outputs(pipe, tmp_path):
    gen = pipe.generate(PROMPT, time_length=0, width=544, height=480, seed=9, progress=False)
    written = pipe.write_outputs(gen, tmp_path / "img.mp4", save_latents=True)
    assert written == tmp_path / "img.png" and written.exists()
    latents = load_file(str(tmp_path / "img.latents.safetensors"))["latents"]
    torch.testing.assert_close(latents, gen.latents)
    assert latents.shape == (1, 60, 68, 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=500, height=500), r"height x width = 500x500 is not allowed.*512x512"),
    (dict(time_length=-1), r"time_length=-1 is out of range; allowed: 0\.\.63"),
    (dict(time_length=64), r"time_length=64 is out of range"),
    (dict(time_length=1.5), r"time_length=1\.5 must be a whole number"),
    (dict(text="   "), r"prompt='   ' is empty"),
    (dict(bs=2), r"bs=2 is not supported"),
])
def test_bad_requests_fail_before_work(pipe, tmp_path, kwargs, message, monkeypatch):
    call = dict(text=PROMPT, save_path=str(tmp_path / "x.mp4"), time_length=1, width=512, height=512, seed=1)
    call.update(kwargs)
    for stage in ("encode_text", "denoise", "decode"):  # any of them running means work began before the check
        monkeypatch.setattr(pipe, stage, lambda *a, stage=stage, **k: pytest.fail(f"{stage} ran before the check"))
    with pytest.raises(ValueError, match=message):
        pipe(**call)
    assert not list(tmp_path.iterdir())


def test_existing_output_is_kept_without_overwrite(pipe, tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"yesterday's result")
    gen = pipe.generate(PROMPT, time_length=0, width=512, height=512, seed=1, progress=False)
    with pytest.raises(FileExistsError):
        pipe.write_outputs(gen, target, overwrite=False)
    assert target.read_bytes() == b"yesterday's result"


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    long_prompt = " ".join(["snow"] * 300)
    with caplog.at_level("WARNING", logger="k4flash"):
        embed = pipe.encode_text(long_prompt)
    assert embed.shape == (1, 224, TINY_DIT_PARAMS["in_text_dim"])
    assert any("truncated" in r.message and "first 224" in r.message for r in caplog.records)


def test_the_api_keeps_an_existing_video_like_the_cli_and_checks_before_work(pipe, tmp_path, monkeypatch):
    target = tmp_path / "mine.mp4"
    target.write_bytes(b"the user's own video")
    monkeypatch.setattr(pipe, "generate", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(FileExistsError, match=r"mine\.mp4 already exists .*pass overwrite=True"):
        pipe(text=PROMPT, save_path=str(target), time_length=1, width=512, height=512, seed=1)
    assert target.read_bytes() == b"the user's own video"
    monkeypatch.undo()
    assert pipe(text=PROMPT, save_path=str(target), time_length=0, width=512, height=512, seed=1,
                overwrite=False)[0].size == (512, 512)  # an image is returned, nothing is written (as documented)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.mp4"]


def test_get_tiny_pipeline_is_one_call(tiny_cache, monkeypatch):
    from k4flash import get_tiny_pipeline

    monkeypatch.setenv("K4FLASH_CACHE", str(tiny_cache))
    tiny = get_tiny_pipeline("cpu")
    assert tiny.dit.transformer_blocks[0][0].feed_forward.in_layer.out_features == TINY_DIT_PARAMS["ff_dim"]
    assert tiny(text=PROMPT, time_length=0, width=512, height=512, seed=1)[0].size == (512, 512)


@pytest.mark.parametrize("existing, kwargs", [("mine.json", {}), ("mine.latents.safetensors", {"save_latents": True})])
def test_the_calls_existing_sidecar_or_latents_are_refused_before_any_work(pipe, tmp_path, monkeypatch, existing,
                                                                            kwargs):
    (tmp_path / existing).write_text("keep")
    monkeypatch.setattr(pipe, "generate", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(FileExistsError, match=rf"{existing} already exists .*pass overwrite=True"):
        pipe("a red square", save_path=tmp_path / "mine.mp4", time_length=1, width=512, height=512, seed=1, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
