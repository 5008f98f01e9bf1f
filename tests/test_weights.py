"""Strict, validated DiT loading and weight-path resolution."""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from k4flash.tiny import TINY_DIT_PARAMS, tiny_dit_state_dict
from k4flash.weights import CheckpointError, DERIVED_KEYS, load_dit, resolve_weight_paths


@pytest.fixture(scope="module")
def state():
    return tiny_dit_state_dict(0)


def _save(tmp_path, state, name="dit.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_load_round_trip_with_and_without_rope_buffers(tmp_path, state):
    with_rope = load_dit(TINY_DIT_PARAMS, _save(tmp_path, state, "a.pt"))
    without = {k: v for k, v in state.items() if k not in DERIVED_KEYS}
    without_rope = load_dit(TINY_DIT_PARAMS, _save(tmp_path, without, "b.pt"))
    for key, value in state.items():
        torch.testing.assert_close(with_rope.state_dict()[key], value, rtol=0, atol=0)
        torch.testing.assert_close(without_rope.state_dict()[key], value, rtol=0, atol=0)
    assert not with_rope.training and not any(p.requires_grad for p in with_rope.parameters())


def test_safetensors_checkpoint_loads_the_same_one_tensor_at_a_time(tmp_path, state, monkeypatch):
    import safetensors
    import safetensors.torch

    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    # Never the whole file at once: load_file is off limits, and every read is of one tensor.
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("whole-file read"))
    reads, real_open = [], safetensors.safe_open

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            file = self.handle.__enter__()
            return type("F", (), {"keys": file.keys, "get_slice": lambda _, key: reads.append(key) or
                                  file.get_slice(key)})()

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    model = load_dit(TINY_DIT_PARAMS, path)
    parameters = dict(model.named_parameters())
    for key, value in parameters.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert reads.count("out_layer.out_layer.weight") == 2  # its shape, then its values: once each


def test_missing_key_is_named(tmp_path, state):
    broken = dict(state)
    del broken["transformer_blocks.0.1.feed_forward.in_layer.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1 key.*transformer_blocks\.0\.1\.feed_forward\.in_layer\.bias"):
        load_dit(TINY_DIT_PARAMS, _save(tmp_path, broken))


def test_unexpected_key_is_named(tmp_path, state):
    broken = dict(state, **{"transformer_blocks.1.0.self_attention_norm.weight": torch.ones(128)})
    with pytest.raises(CheckpointError, match=r"unexpected key.*transformer_blocks\.1\.0\.self_attention_norm\.weight"):
        load_dit(TINY_DIT_PARAMS, _save(tmp_path, broken))


def test_misshaped_key_names_both_shapes(tmp_path, state):
    broken = dict(state, **{"text_embeddings.in_layer.weight": torch.ones(128, 64)})
    with pytest.raises(CheckpointError, match=r"text_embeddings\.in_layer\.weight.*\(128, 64\).*\(128, 32\)"):
        load_dit(TINY_DIT_PARAMS, _save(tmp_path, broken))


def test_truncated_checkpoint_is_a_clear_error(tmp_path, state):
    path = _save(tmp_path, state)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read DiT checkpoint"):
        load_dit(TINY_DIT_PARAMS, path)


class _CallsTorchFull:
    """Unpickles to a tensor of the right shape by calling torch.full: fine for a plain torch.load, refused by
    weights_only=True (a call to a global outside its allow-list)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __reduce__(self):
        return torch.full, (self.shape, 0.5)


def test_pickled_code_is_refused(tmp_path, state):
    """The only thing wrong with this checkpoint is a pickled call: with weights_only=False it would load whole."""
    key = "out_layer.out_layer.weight"
    path = tmp_path / "evil.pt"
    torch.save(dict(state, **{key: _CallsTorchFull(state[key].shape)}), path)
    # The same values pickled as a plain tensor load: the refusal below is the pickled call's alone.
    load_dit(TINY_DIT_PARAMS, _save(tmp_path, dict(state, **{key: torch.full(state[key].shape, 0.5)}), "plain.pt"))
    with pytest.raises(CheckpointError, match="cannot read DiT checkpoint"):
        load_dit(TINY_DIT_PARAMS, path)


def test_missing_weights_name_the_file_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"dit weights not found at .*kandinsky4_distil_512\.pt"):
        resolve_weight_paths(tmp_path)
    (tmp_path / "kandinsky4_distil_512.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"vae weights not found at .*vae"):
        resolve_weight_paths(tmp_path)


def test_a_checkpoint_of_another_size_is_recognised_and_named(tiny_weights):
    """The tiny checkpoint loaded as the published DiT (the model card's call without dit_params=)."""
    from k4flash.published import PUBLISHED_DIT_PARAMS

    with pytest.raises(CheckpointError, match=r"another size: it has 1 block pair of width 128, the model built has "
                                              r"21 block pairs of width 3072 \(the published DiT\); pass its "
                                              r"dit_params="):
        load_dit(PUBLISHED_DIT_PARAMS, tiny_weights / "kandinsky4_distil_512.pt")


def test_the_convert_command_writes_what_loads_and_refuses_to_overwrite(tmp_path, state):
    """`python -m parallel.convert` as a user runs it: the .safetensors it writes loads to the same weights;
    run again, it keeps the file (exit 0, the path printed); a missing checkpoint is one error line, exit 2."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    source = _save(tmp_path, state)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    run = lambda *args: subprocess.run([sys.executable, "-m", "parallel.convert", *args], cwd=tmp_path, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    first = run(str(source))
    target = source.with_suffix(".safetensors")
    assert first.returncode == 0 and first.stdout.strip() == str(target), first.stderr
    converted = load_file(str(target))
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)
    mtime = target.stat().st_mtime_ns
    assert run(str(source)).returncode == 0 and target.stat().st_mtime_ns == mtime  # already there: kept
    missing = run(str(tmp_path / "nowhere.pt"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1
