"""The DiT against docs/model.md: key set, the literal reference forward, RoPE, patch order, batching."""
import math

import pytest
import torch

from k4flash.dit_math import apply_rope, rope_angle_table, rope_cos_sin
from k4flash.dit import DiffusionTransformer3D
from k4flash.published import PUBLISHED_DIT_PARAMS
from k4flash.reference import reference_forward
from k4flash.tiny import TINY_DIT_PARAMS, tiny_dit_state_dict

from parity import assert_parity


def get_init_dict(**overrides):
    return {**TINY_DIT_PARAMS, **overrides}


def build(params=None, seed=0):
    params = params or get_init_dict()
    model = DiffusionTransformer3D(**params).eval()
    state = tiny_dit_state_dict(seed) if params == TINY_DIT_PARAMS else _random_state(model, seed)
    model.load_state_dict(state)
    return model


def _random_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("rope_embeddings"):
            state[key] = value
        elif value.ndim == 2:
            state[key] = torch.randn(value.shape, generator=g) / math.sqrt(value.shape[1])
        else:
            state[key] = 0.1 * torch.randn(value.shape, generator=g) + (1.0 if key.endswith("norm.weight") else 0.0)
    return state


def published_keys(num_blocks):
    keys = [f"{m}.{p}" for m in ("time_embeddings.in_layer", "time_embeddings.out_layer", "text_embeddings.in_layer",
                                  "visual_embeddings.in_layer", "out_layer.norm", "out_layer.out_layer",
                                  "out_layer.modulation_out") for p in ("weight", "bias")]
    keys += [f"rope_embeddings.args_{i}" for i in range(3)]
    block = ["visual_modulation.out_layer", "text_modulation.out_layer", "self_attention_norm",
             "self_attention.to_query_key_value", "self_attention.query_norm", "self_attention.key_norm",
             "self_attention.output_layer", "feed_forward_norm", "feed_forward.in_layer", "feed_forward.out_layer"]
    keys += [f"transformer_blocks.{i}.{j}.{m}.{p}" for i in range(num_blocks) for j in range(2)
             for m in block for p in ("weight", "bias")]
    return set(keys)


def test_state_dict_keys_and_shapes_are_the_published_ones():
    with torch.device("meta"):
        model = DiffusionTransformer3D(**{**PUBLISHED_DIT_PARAMS, "num_blocks": 2})  # published widths, 2 of the 21 pairs
    state = model.state_dict()
    assert set(state) == published_keys(2)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["time_embeddings.in_layer.weight"] == (512, 3072)
    assert shapes["text_embeddings.in_layer.weight"] == (3072, 4096)
    assert shapes["visual_embeddings.in_layer.weight"] == (3072, 64)
    assert shapes["transformer_blocks.1.1.visual_modulation.out_layer.weight"] == (6 * 3072, 512)
    assert shapes["transformer_blocks.0.0.self_attention.to_query_key_value.weight"] == (3 * 3072, 3072)
    assert shapes["transformer_blocks.0.0.self_attention.query_norm.weight"] == (64,)
    assert shapes["transformer_blocks.0.1.feed_forward.in_layer.weight"] == (12288, 3072)
    assert shapes["out_layer.out_layer.weight"] == (64, 3072)
    assert shapes["out_layer.modulation_out.weight"] == (2 * 3072, 512)
    assert shapes["rope_embeddings.args_1"] == (128, 12)


@pytest.mark.parametrize("latent", [(3, 8, 12), (1, 6, 4)])
def test_forward_matches_literal_spec_reference(latent):
    model = build()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*latent, 16, generator=g)
    text = torch.randn(24, TINY_DIT_PARAMS["in_text_dim"], generator=g)
    with torch.no_grad():
        out = model(x[None], text[None], torch.tensor([749.0]))[0]
    expected = reference_forward(model.state_dict(), TINY_DIT_PARAMS, x, text, 749.0)
    assert out.shape == x.shape
    assert out.abs().max() > 0.1  # a real signal, not a zeroed model
    assert_parity(out, expected, atol=1e-5, rtol=1e-5, what="velocity")


def test_reference_is_sensitive_to_modulation_chunk_order():
    """The parity check above can fail: swapping shift and scale of one chunk moves the output."""
    model = build()
    state = model.state_dict()
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 4, 4, 16, generator=g), torch.randn(8, TINY_DIT_PARAMS["in_text_dim"], generator=g)
    baseline = reference_forward(state, TINY_DIT_PARAMS, x, text, 499.0)
    swapped = dict(state)
    for suffix in ("weight", "bias"):
        key = f"transformer_blocks.0.0.visual_modulation.out_layer.{suffix}"
        chunks = list(state[key].chunk(6))
        chunks[0], chunks[1] = chunks[1], chunks[0]
        swapped[key] = torch.cat(chunks)
    assert (reference_forward(swapped, TINY_DIT_PARAMS, x, text, 499.0) - baseline).abs().max() > 1e-3


def test_batched_forward_equals_per_video_forward():
    model = build()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 6, 16, generator=g)
    text = torch.randn(2, 10, TINY_DIT_PARAMS["in_text_dim"], generator=g)
    t = torch.tensor([999.0, 249.0])
    with torch.no_grad():
        batched = model(x, text, t)
        single = torch.cat([model(x[i:i + 1], text[i:i + 1], t[i:i + 1]) for i in range(2)])
    assert_parity(batched, single, atol=1e-5, rtol=1e-5, what="velocity")


def test_rope_closed_form():
    axes = (4, 6, 6)
    tables = [rope_angle_table(d) for d in axes]
    cos, sin = rope_cos_sin(tables, (2, 3, 5))
    # token (f=1, h=2, w=3) sits at row-major index 1*15 + 2*5 + 3
    n = 1 * 15 + 2 * 5 + 3
    angles = torch.cat([pos * torch.exp(-math.log(10000.0) * torch.arange(d // 2) / (d // 2))
                        for pos, d in zip((1, 2, 3), axes)])
    torch.testing.assert_close(cos[n], torch.cos(angles))
    torch.testing.assert_close(sin[n], torch.sin(angles))
    # adjacent pairs rotate: (x0, x1) → (x0 cos − x1 sin, x0 sin + x1 cos)
    x = torch.randn(1, 1, 30, 16)
    out = apply_rope(x, cos, sin)
    x0, x1 = x[0, 0, n, 2], x[0, 0, n, 3]
    c, s = torch.cos(angles[1]), torch.sin(angles[1])
    torch.testing.assert_close(out[0, 0, n, 2:4], torch.stack([x0 * c - x1 * s, x0 * s + x1 * c]))


def test_rope_is_float32_even_in_bf16_model():
    model = DiffusionTransformer3D(**get_init_dict()).to(torch.bfloat16)
    cos, _ = model.rope_embeddings((3, 100, 2), torch.device("cpu"))
    assert cos.dtype == torch.float32
    expected = torch.cos(torch.tensor(99.0) * torch.exp(-math.log(10000.0) * torch.arange(3) / 3.0))
    torch.testing.assert_close(cos.view(3, 100, 2, -1)[0, 99, 0, 2:5], expected)


def test_patch_order_in_and_out():
    """Input patch vectors are (pt, ph, pw, C) with C fastest; outputs are (C, pt, ph, pw)."""
    model = build()
    x = torch.zeros(1, 1, 2, 2, 16)
    x[0, 0, 1, 0, 5] = 1.0  # ph=1, pw=0, C=5 → input index (1*2 + 0)*16 + 5 = 37
    emb = model.visual_embeddings(x)[0, 0] - model.visual_embeddings.in_layer.bias
    torch.testing.assert_close(emb, model.visual_embeddings.in_layer.weight[:, 37])
    # Make the final Linear emit its own output index, then read where each index lands.
    hook = model.out_layer.out_layer.register_forward_hook(lambda mod, inp, out: torch.arange(64.0).expand_as(out))
    out = model.out_layer(torch.zeros(1, 1, TINY_DIT_PARAMS["model_dim"]), 1, torch.zeros(1, 32), (1, 1, 1))
    hook.remove()
    assert out.shape == (1, 1, 2, 2, 16)
    assert out[0, 0, 1, 0, 5] == 5 * 4 + 1 * 2 + 0  # index c·4 + ph·2 + pw


def test_bad_latent_size_is_rejected():
    model = build()
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.zeros(1, 2, 3, 4, 16), torch.zeros(1, 4, 32), torch.zeros(1))


def test_attention_runs_on_the_chosen_sdpa_backends():
    """The model's sdpa_backends reach SDPA: only cuDNN (no CPU kernel) fails, math alone gives the same output."""
    model = build()
    x = torch.randn(1, 3, 8, 12, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 24, TINY_DIT_PARAMS["in_text_dim"], generator=torch.Generator().manual_seed(2))
    t = torch.tensor([499.0])
    with torch.no_grad():
        default = model(x, text, t)
        model.sdpa_backends = ("math",)
        math_only = model(x, text, t)
        model.sdpa_backends = ("cudnn",)
        with pytest.raises(RuntimeError, match="No viable backend|No available kernel"):
            model(x, text, t)
        model.sdpa_backends = ("flash", "nope")
        with pytest.raises(ValueError, match=r"allowed names are \['flash', 'efficient', 'cudnn', 'math'\]"):
            model(x, text, t)
    assert_parity(math_only, default, atol=1e-5, rtol=1e-5, what="velocity")
    assert default.abs().mean() > 0.1


class _OpDevices(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op name, device of each tensor output) of every aten op run inside it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else [out]
        self.seen += [(func.__name__, t.device.type) for t in outputs if isinstance(t, torch.Tensor)]
        return out


def test_rope_and_time_tables_of_a_new_grid_are_made_on_the_device_that_uses_them():
    # The meta device stands in for a GPU: anything made on the host, or copied over, shows as a cpu output
    # or a copy op; on a GPU either would be a blocking pageable host → device copy per new geometry. Only the
    # frequencies come from the host (exp on the CPU, as the official code computes them), once per device.
    model = DiffusionTransformer3D(**get_init_dict())
    meta = torch.device("meta")
    model.rope_embeddings((3, 4, 6), meta), model.time_embeddings.freqs(meta)  # the first grid on this device
    with _OpDevices() as ops:
        cos, sin = model.rope_embeddings((5, 4, 6), meta)  # a new grid
        freqs = model.time_embeddings.freqs(meta)
    assert cos.device.type == sin.device.type == freqs.device.type == "meta"
    assert ops.seen and all(device == "meta" for _, device in ops.seen), ops.seen
    assert not [name for name, _ in ops.seen if "copy" in name or "_to_copy" in name], ops.seen
    # On the CPU the tables are the ones built from the free functions, bit for bit.
    cos, sin = model.rope_embeddings((3, 4, 6), torch.device("cpu"))
    ref_cos, ref_sin = rope_cos_sin([rope_angle_table(d) for d in model.rope_embeddings.axes_dims], (3, 4, 6))
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_frequencies_are_the_host_ones_on_every_device():
    """exp on a GPU can differ from the CPU's in the last bit, and the time embedding's angles reach ~1000 rad: the
    frequencies are always the CPU's (the official code's), whatever device runs the model."""
    from k4flash.dit_math import sinusoid_freqs
    model = DiffusionTransformer3D(**get_init_dict())
    with _OpDevices() as ops:
        model.time_embeddings.freqs(torch.device("meta"))
        model.rope_embeddings((3, 4, 6), torch.device("meta"))
    assert [name for name, device in ops.seen if name.split(".")[0] == "exp" and device != "cpu"] == []
    assert torch.equal(model.time_embeddings.freqs(torch.device("cpu")), sinusoid_freqs(model.time_embeddings.num_freqs))


def test_rope_tables_are_cached_per_grid_and_the_cache_is_bounded(monkeypatch):
    import k4flash.dit as dit_module

    builds = []
    monkeypatch.setattr(dit_module, "rope_cos_sin", lambda tables, grid: builds.append(tuple(grid)) or
                        rope_cos_sin(tables, grid))
    rope = DiffusionTransformer3D(**get_init_dict()).rope_embeddings
    cpu = torch.device("cpu")
    first = rope((3, 4, 6), cpu)
    for grid in [(3, 8, 6), (3, 4, 6), (3, 8, 6), (3, 4, 6)]:  # a server alternating two video sizes
        rope(grid, cpu)
    assert builds == [(3, 4, 6), (3, 8, 6)]
    assert rope((3, 4, 6), cpu) is first  # the same tensors, not a rebuild
    for f in range(1, rope.cache_size + 3):
        rope((f, 2, 2), cpu)
    assert len(rope._tables) == rope.cache_size
    assert builds[-1] == (rope.cache_size + 2, 2, 2) and len(builds) == 2 + rope.cache_size + 2


def test_the_sdpa_backends_are_tried_in_the_order_given(monkeypatch):
    """sdpa_kernel without set_priority=True only restricts the backends; torch then tries them in its own order, so
    ("efficient", "flash") would still run flash where both apply."""
    import k4flash.dit_math as dit_math
    calls = []
    real = dit_math.sdpa_kernel
    monkeypatch.setattr(dit_math, "sdpa_kernel", lambda backends, **kwargs: calls.append((backends, kwargs)) or
                        real(backends, **kwargs))
    with dit_math.attention_backends(("math", "flash")):
        q = torch.randn(1, 2, 8, 16)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert calls == [([dit_math.SDPA_BACKENDS["math"], dit_math.SDPA_BACKENDS["flash"]], {"set_priority": True})]
