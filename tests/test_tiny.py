import json

import pytest
import torch

import k4flash.tiny as tiny
from k4flash.dit import DiffusionTransformer3D
from k4flash.published import DIT_FILENAME
from k4flash.sampler import DEFAULT_SCHEDULER_CONFIG
from k4flash.tiny import TINY_DIT_PARAMS, default_cache_dir, ensure_tiny_weights, tiny_dit_state_dict

LAYOUT = [
    DIT_FILENAME,
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/spiece.model",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
]
BYTE_IDENTICAL = [path for path in LAYOUT if not path.endswith("config.json")] + ["scheduler/scheduler_config.json"]


def load_dit_file(folder):
    return torch.load(folder / DIT_FILENAME, map_location="cpu", weights_only=True)


def test_layout_matches_the_published_weights(tiny_weights):
    for relative in LAYOUT:
        assert (tiny_weights / relative).is_file(), relative
    assert json.loads((tiny_weights / "scheduler" / "scheduler_config.json").read_text()) == DEFAULT_SCHEDULER_CONFIG


def test_dit_file_is_a_plain_state_dict_that_loads_strictly(tiny_weights):
    state = load_dit_file(tiny_weights)
    assert isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values())
    model = DiffusionTransformer3D(**TINY_DIT_PARAMS)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)
    assert state["text_embeddings.in_layer.weight"].shape == (128, 32)  # model_dim x in_text_dim


def test_every_dit_tensor_is_non_zero(tiny_weights):
    state = load_dit_file(tiny_weights)
    reference = DiffusionTransformer3D(**TINY_DIT_PARAMS).state_dict()
    for name, tensor in state.items():
        if name.startswith("rope_embeddings.args_"):
            assert torch.equal(tensor, reference[name]), name  # derived: left as built
        else:
            assert (tensor != 0).all(), name
            assert not torch.equal(tensor, reference[name]), name  # overwritten, not the default init
    modulation = state["transformer_blocks.0.0.visual_modulation.out_layer.weight"]
    assert 0.5 < modulation.std() * 32**0.5 < 1.5  # N(0, 1/fan_in), fan_in = time_dim = 32


def test_state_dict_depends_only_on_seed():
    torch.manual_seed(123)
    first = tiny_dit_state_dict(seed=0)
    global_rng_after = torch.rand(1)
    torch.manual_seed(123)
    second = tiny_dit_state_dict(seed=0)
    assert torch.equal(torch.rand(1), global_rng_after)  # the global RNG is left alone
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = tiny_dit_state_dict(seed=1)
    assert not torch.equal(first["out_layer.out_layer.weight"], other["out_layer.out_layer.weight"])


def test_rebuild_gives_identical_bytes(tiny_weights, tmp_path):
    rebuilt = ensure_tiny_weights(tmp_path / "again")
    first, second = load_dit_file(tiny_weights), load_dit_file(rebuilt)
    assert list(first) == list(second)
    for name in first:
        assert first[name].dtype == second[name].dtype
        assert first[name].numpy().tobytes() == second[name].numpy().tobytes(), name
    for relative in BYTE_IDENTICAL:
        assert (tiny_weights / relative).read_bytes() == (rebuilt / relative).read_bytes(), relative


def test_complete_folder_is_reused_without_building(tiny_weights, monkeypatch):
    def no_build(folder):
        raise AssertionError("rebuilt a complete folder")

    monkeypatch.setattr(tiny, "_build_tiny_weights", no_build)
    assert ensure_tiny_weights(tiny_weights) == tiny_weights
    assert ensure_tiny_weights(str(tiny_weights)) == tiny_weights


def test_losing_the_build_race_uses_the_winners_folder(tmp_path, monkeypatch):
    root = tmp_path / "cache" / "tiny"
    real_build = tiny._build_tiny_weights

    def build_while_another_rank_finishes_first(folder):
        real_build(folder)
        real_build(root)  # the "other rank" renames its complete folder into place first
        (root / "winner").write_text("yes")

    monkeypatch.setattr(tiny, "_build_tiny_weights", build_while_another_rank_finishes_first)
    assert ensure_tiny_weights(root) == root
    assert (root / "winner").read_text() == "yes"
    assert [p.name for p in root.parent.iterdir()] == ["tiny"]  # our private build folder is gone


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken_build(folder):
        folder.mkdir(parents=True)
        (folder / DIT_FILENAME).write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(tiny, "_build_tiny_weights", broken_build)
    with pytest.raises(OSError, match="simulated"):
        ensure_tiny_weights(tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


def test_foreign_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete tiny-weights folder"):
        ensure_tiny_weights(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("K4FLASH_CACHE", str(tmp_path / "k4"))
    assert default_cache_dir() == tmp_path / "k4"
    monkeypatch.delenv("K4FLASH_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "k4flash")


def test_scheduler_config_gives_the_distilled_timesteps(tiny_weights):
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler.from_pretrained(tiny_weights / "scheduler")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    alphas = scheduler.alphas_cumprod[scheduler.timesteps].float()
    torch.testing.assert_close(alphas, torch.tensor([0.0, 0.0332, 0.2424, 0.6542]), atol=1e-3, rtol=0)


def test_text_encoder_config_fits_the_tokenizer_and_the_dit(tiny_weights):
    from transformers import AutoTokenizer, T5Config

    config = T5Config.from_pretrained(tiny_weights / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(tiny_weights / "tokenizer")
    assert config.d_model == TINY_DIT_PARAMS["in_text_dim"]
    assert config.is_gated_act and config.dense_act_fn == "gelu_new"  # T5 v1.1
    assert len(tokenizer) <= config.vocab_size and config.vocab_size % 128 == 0
