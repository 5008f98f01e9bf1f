"""Regenerate official.safetensors from ai-forever/Kandinsky-4's own code, outside this project (README.md here).

    python tests/golden/make_golden.py --official /path/to/Kandinsky-4 [--out tests/golden/official.safetensors]

Runs the official DiT and the official renoise sampler (kandinsky/model/dit.py,
kandinsky/t2v_pipeline.py::diffusion_generate_renoise) on CPU in float32 with the tiny
published-layout weights that k4flash.tiny builds, and stores only their numbers. Two stand-ins
are put in sys.modules first, because the official code imports them and this machine has neither:
`flash_attn.flash_attn_varlen_qkvpacked_func` as SDPA run on each packed sequence, and
`torchvision.transforms.ToPILImage` (imported by the pipeline module, never called here).
"""
import argparse
import hashlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from k4flash.tiny import TINY_DIT_PARAMS, ensure_tiny_weights, tiny_dit_state_dict

OFFICIAL_COMMIT = "7506103"  # ai-forever/Kandinsky-4, the commit these numbers come from
TIMESTEPS = (999, 749, 249)
SEED, PIPELINE_SEED = 1234, 7
VISUAL, TEXT_TOKENS = (3, 8, 12), 20
PROMPT, PROMPT_SEED, PROMPT_LATENT = "a red square on a blue field", 11, (1, 64, 64)  # an image, 512x512


def tiny_builder_fingerprint() -> str:
    """sha256 over the tiny DiT's keys, shapes and bytes: the golden numbers hold for these weights only."""
    digest = hashlib.sha256()
    for key, value in sorted(tiny_dit_state_dict(0).items()):
        digest.update(key.encode() + str(tuple(value.shape)).encode())
        digest.update(value.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def golden_inputs():
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(*VISUAL, TINY_DIT_PARAMS["in_visual_dim"], generator=generator)  # (F, H, W, C)
    text = torch.randn(TEXT_TOKENS, TINY_DIT_PARAMS["in_text_dim"], generator=generator)  # (L, D)
    return x, text


def _stand_ins():
    # Before the torchvision stand-in: diffusers probes which packages exist as it imports its modules.
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler  # noqa: F401

    def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, return_attn_probs=False, **_):
        parts = []
        bounds = cu_seqlens.tolist()
        for start, stop in zip(bounds[:-1], bounds[1:]):
            q, k, v = (t.transpose(0, 1) for t in qkv[start:stop].unbind(1))  # (heads, n, head_dim)
            parts.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1))
        out = torch.cat(parts)  # (total, heads, head_dim)
        return (out, None, None) if return_attn_probs else out

    flash_attn = types.ModuleType("flash_attn")
    flash_attn.flash_attn_varlen_qkvpacked_func = flash_attn_varlen_qkvpacked_func
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = types.ModuleType("torchvision.transforms")
    torchvision.transforms.ToPILImage = object
    sys.modules.update({"flash_attn": flash_attn, "torchvision": torchvision,
                        "torchvision.transforms": torchvision.transforms})


def _import_official_package(folder: Path) -> None:
    """The checkout's `kandinsky` package imported from its folder (its submodules then resolve through it)."""
    spec = importlib.util.spec_from_file_location("kandinsky", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kandinsky"] = module
    spec.loader.exec_module(module)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of ai-forever/Kandinsky-4")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("official.safetensors"))
    args = parser.parse_args(argv)
    _stand_ins()
    _import_official_package(args.official / "kandinsky")
    from diffusers import CogVideoXDDIMScheduler
    from kandinsky.model.dit import DiffusionTransformer3D
    from kandinsky.t2v_pipeline import diffusion_generate_renoise

    torch.set_num_threads(1)
    dit = DiffusionTransformer3D(**TINY_DIT_PARAMS)
    missing, unexpected = dit.load_state_dict(tiny_dit_state_dict(0), strict=False)
    assert not unexpected and all(k.startswith("rope_embeddings.") for k in missing), (missing, unexpected)
    dit.eval()
    x, text = golden_inputs()
    visual_cu = torch.tensor([0, VISUAL[0]], dtype=torch.int32)
    text_cu = torch.tensor([0, TEXT_TOKENS], dtype=torch.int32)
    tensors = {"x": x, "text_embed": text}
    with torch.no_grad():
        for t in TIMESTEPS:
            tensors[f"velocity_t{t}"] = dit(x, text, torch.tensor([t]), visual_cu, text_cu).contiguous()

        def float32_dit(latent, text_embed, time, *rest):  # the pipeline casts to bf16 for its CUDA autocast
            return dit(latent.float(), text_embed.float(), time, *rest)

        scheduler = CogVideoXDDIMScheduler.from_pretrained(str(ensure_tiny_weights() / "scheduler"))
        latents = diffusion_generate_renoise(float32_dit, scheduler, (*VISUAL, TINY_DIT_PARAMS["in_visual_dim"]), "cpu",
                                             4, text, visual_cu, text_cu, seed=PIPELINE_SEED)
    tensors["final_latents"] = latents.float().contiguous()

    # One prompt through the official T5 embedder, the same sampler, then the decode of an image: the
    # official __call__ needs CUDA (`.to(local_dit_rank)`), so its decode lines for time_length 0
    # (t2v_pipeline.py, "# VAE") and ToPILImage's conversion are transcribed here, in float32.
    from diffusers import AutoencoderKLCogVideoX
    from kandinsky.model.text_embedders import T5TextEmbedder
    from omegaconf import OmegaConf

    weights = ensure_tiny_weights()
    conf = OmegaConf.create({"text_embedder": {"params": {"checkpoint_path": str(weights / "text_encoder"),
                                                          "tokenizer_path": str(weights / "tokenizer")},
                                               "tokens_lenght": 224}})
    embedder = T5TextEmbedder(conf)
    vae = AutoencoderKLCogVideoX.from_pretrained(str(weights / "vae")).eval()
    with torch.no_grad():
        prompt_embed = embedder(PROMPT).squeeze(0)  # (224, d_model)
        text_cu = torch.tensor([0, prompt_embed.shape[0]], dtype=torch.int32)
        visual_cu = torch.tensor([0, PROMPT_LATENT[0]], dtype=torch.int32)
        video_latents = diffusion_generate_renoise(float32_dit, scheduler, (*PROMPT_LATENT, TINY_DIT_PARAMS["in_visual_dim"]),
                                                   "cpu", 4, prompt_embed, visual_cu, text_cu, seed=PROMPT_SEED).float()
        vae.num_latent_frames_batch_size = 1  # time_length == 0
        images = 1 / vae.config.scaling_factor * video_latents
        images = vae.decode(images.permute(0, 3, 1, 2).unsqueeze(2)).sample.float()  # (1, 3, 1, H, W)
        images = torch.clip((images + 1.) / 2., 0., 1.)
        # ToPILImage, as the official code returns an image: mul(255) then a byte cast, (H, W, 3)
        frame = images[0, :, 0].mul(255).byte().permute(1, 2, 0)
    tensors.update(prompt_embed=prompt_embed.contiguous(), prompt_latents=video_latents.contiguous(),
                   prompt_frame=frame.contiguous())
    metadata = {"official_commit": OFFICIAL_COMMIT, "tiny_builder_sha256": tiny_builder_fingerprint(),
                "prompt": PROMPT, "prompt_seed": str(PROMPT_SEED),
                "timesteps": ",".join(map(str, TIMESTEPS)), "seed": str(SEED), "pipeline_seed": str(PIPELINE_SEED),
                "scheduler_timesteps": ",".join(str(int(t)) for t in scheduler.timesteps)}
    save_file(tensors, str(args.out), metadata=metadata)
    print(f"wrote {args.out}: {sorted(tensors)}; {metadata}")


if __name__ == "__main__":
    main()
