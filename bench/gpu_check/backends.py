"""Section 2: the model's default SDPA backends against the math kernel, in fp32 and under bf16 autocast, at a
reduced geometry where math attention's S x S scores fit."""
import contextlib

import torch
import torch.nn.functional as F

from bench.configs import autocast_for, dit_inputs
from bench.gpu_check.run import compare
from k4flash.dit_math import attention_backends
from parallel import cost

MATH_SCORES_LIMIT_GIB = 20.0


def sdpa_backend_used(names, device, dtype, heads, head_dim):
    """The backend SDPA takes among `names` (it takes the first that supports the inputs), by trying each alone."""
    q = torch.randn(1, heads, 256, head_dim, device=device, dtype=dtype)
    for name in names:
        try:
            with attention_backends((name,)), torch.no_grad(), _quiet_warnings():
                F.scaled_dot_product_attention(q, q, q)
            return name
        except RuntimeError:  # "No available kernel": this backend does not take these inputs
            continue
    return None


@contextlib.contextmanager
def _quiet_warnings():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each refused backend warns why; the probe only wants the answer
        yield


def set_dtype_(model, dtype):
    """Cast the DiT's parameters in place; bf16 → fp32 → bf16 restores them exactly. The RoPE buffers are
    rebuilt in float32 (the forward recomputes its tables, but they should not stay rounded)."""
    device = next(model.parameters()).device
    model.to(dtype)
    model.init_derived_buffers()
    return model.to(device)


def check_backends(model, config, device, dtype):
    """Section 2: rows comparing the default backends (fp32 and bf16) against fp32 math at the reduced geometry."""
    params = config["params"]
    latent, text_tokens = config["fidelity_latent"], config["text_tokens"]
    tokens = cost.dit_tokens(params, latent) + text_tokens
    heads = params["model_dim"] // sum(params["axes_dims"])
    scores_gib = tokens**2 * heads * 4 / 2**30
    assert scores_gib < MATH_SCORES_LIMIT_GIB, f"math attention would hold {scores_gib:.1f} GiB of scores"
    x, text, t = dit_inputs(dict(config, latent=latent), device, torch.float32)
    default = tuple(model.sdpa_backends)

    def forward(run_dtype, backends):
        model.sdpa_backends = backends
        try:
            with torch.no_grad(), autocast_for(device, run_dtype)():
                return model(x.to(run_dtype), text.to(run_dtype), t).float()
        finally:
            model.sdpa_backends = default

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    try:
        set_dtype_(model, torch.bfloat16)
        bf16_default = forward(torch.bfloat16, default)
        set_dtype_(model, torch.float32)  # the same (bf16-representable) weights: only the arithmetic differs
        fp32_default = forward(torch.float32, default)
        fp32_math = forward(torch.float32, ("math",))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        set_dtype_(model, dtype)
    head_dim = sum(params["axes_dims"])
    common = dict(allowed=", ".join(default), latent="x".join(map(str, latent)), tokens=tokens,
                  math_scores_gib=scores_gib)
    rows = [
        dict(compared="fp32, default backends vs fp32, math", dtype="float32",
             kernel=sdpa_backend_used(default, device, torch.float32, heads, head_dim),
             finite=bool(torch.isfinite(fp32_default).all() and torch.isfinite(fp32_math).all()),
             **compare(fp32_default, fp32_math), **common),
        dict(compared="bf16 autocast, default backends vs fp32, math", dtype="bfloat16",
             kernel=sdpa_backend_used(default, device, torch.bfloat16, heads, head_dim),
             finite=bool(torch.isfinite(bf16_default).all()), **compare(bf16_default, fp32_math), **common),
    ]
    return rows
