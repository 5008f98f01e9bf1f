"""A literal, slow transcription of the DiT forward (docs/model.md "DiT forward"), for tests and as a
benchmark baseline.

It shares no code with `dit.py` / `attention.py` on purpose: the visual and text
streams take separate passes through every layer, RoPE tables are rebuilt per call,
patches are cut with explicit loops over the patch grid. One video at a time, float32.
"""
import math

import torch
import torch.nn.functional as F


def _linear(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _layer_norm(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _freqs(d):
    return torch.exp(-math.log(10000.0) * torch.arange(d, dtype=torch.float32) / d)


def _rope(x, positions, axes_dims):
    """x: (N, heads, head_dim); positions: (N, 3) ints → rotated x."""
    angles = torch.cat([positions[:, a:a + 1].float() * _freqs(d // 2)[None] for a, d in enumerate(axes_dims)], dim=1)
    cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]  # (N, 1, head_dim/2)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def reference_forward(sd, params, x, text_embed, timestep):
    """x: (F, H, W, C) latents of one video; text_embed: (L, in_text_dim); timestep: float → (F, H, W, C_out)."""
    pt, ph, pw = params["patch_size"]
    model_dim, axes_dims = params["model_dim"], params["axes_dims"]
    head_dim = sum(axes_dims)
    frames, height, width, channels = x.shape
    gf, gh, gw = frames // pt, height // ph, width // pw

    # 1. Time embedding, cos first.
    args = timestep * _freqs(model_dim // 2)
    time_embed = _linear(sd, "time_embeddings.out_layer",
                         F.silu(_linear(sd, "time_embeddings.in_layer", torch.cat([torch.cos(args), torch.sin(args)]))))
    # 2. Text.
    text = _linear(sd, "text_embeddings.in_layer", text_embed)
    # 3. Visual patches, vector ordered (pt, ph, pw, C), and their (frame, row, column) positions.
    patches, positions = [], []
    for f in range(gf):
        for r in range(gh):
            for c in range(gw):
                block = x[f * pt:(f + 1) * pt, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw, :]
                patches.append(block.reshape(-1))
                positions.append((f, r, c))
    visual = _linear(sd, "visual_embeddings.in_layer", torch.stack(patches))
    positions = torch.tensor(positions)

    def heads(t):
        return t.reshape(t.shape[0], -1, head_dim)

    # 5. Blocks.
    for i in range(params["num_blocks"]):
        for j in range(2):
            p = f"transformer_blocks.{i}.{j}"
            m_v = _linear(sd, f"{p}.visual_modulation.out_layer", F.silu(time_embed)).chunk(6)
            m_t = _linear(sd, f"{p}.text_modulation.out_layer", F.silu(time_embed)).chunk(6)
            a_v = _layer_norm(sd, f"{p}.self_attention_norm", visual) * (1 + m_v[1]) + m_v[0]
            a_t = _layer_norm(sd, f"{p}.self_attention_norm", text) * (1 + m_t[1]) + m_t[0]
            q_v, k_v, v_v = _linear(sd, f"{p}.self_attention.to_query_key_value", a_v).chunk(3, dim=-1)
            q_t, k_t, v_t = _linear(sd, f"{p}.self_attention.to_query_key_value", a_t).chunk(3, dim=-1)
            q_v = _rope(_layer_norm(sd, f"{p}.self_attention.query_norm", heads(q_v)), positions, axes_dims)
            k_v = _rope(_layer_norm(sd, f"{p}.self_attention.key_norm", heads(k_v)), positions, axes_dims)
            q_t = _layer_norm(sd, f"{p}.self_attention.query_norm", heads(q_t))
            k_t = _layer_norm(sd, f"{p}.self_attention.key_norm", heads(k_t))
            q = torch.cat([q_v, q_t]).transpose(0, 1)  # (heads, N + L, head_dim)
            k = torch.cat([k_v, k_t]).transpose(0, 1)
            v = torch.cat([heads(v_v), heads(v_t)]).transpose(0, 1)
            weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
            out = (weights @ v).transpose(0, 1).reshape(-1, model_dim)
            out_v = _linear(sd, f"{p}.self_attention.output_layer", out[:len(visual)])
            out_t = _linear(sd, f"{p}.self_attention.output_layer", out[len(visual):])
            visual = visual + m_v[2] * out_v
            text = text + m_t[2] * out_t

            def ff(h):
                return _linear(sd, f"{p}.feed_forward.out_layer", F.gelu(_linear(sd, f"{p}.feed_forward.in_layer", h)))

            visual = visual + m_v[5] * ff(_layer_norm(sd, f"{p}.feed_forward_norm", visual) * (1 + m_v[4]) + m_v[3])
            text = text + m_t[5] * ff(_layer_norm(sd, f"{p}.feed_forward_norm", text) * (1 + m_t[4]) + m_t[3])

    # 6. Out: shift first, output vector ordered (C, pt, ph, pw).
    shift, scale = _linear(sd, "out_layer.modulation_out", F.silu(time_embed)).chunk(2)
    y = _linear(sd, "out_layer.out_layer", _layer_norm(sd, "out_layer.norm", visual) * (1 + scale) + shift)
    out_channels = y.shape[-1] // (pt * ph * pw)
    result = torch.empty(frames, height, width, out_channels)
    for n, (f, r, c) in enumerate(positions.tolist()):
        result[f * pt:(f + 1) * pt, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw, :] = \
            y[n].reshape(out_channels, pt, ph, pw).permute(1, 2, 3, 0)
    return result
