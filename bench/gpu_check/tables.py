"""The report's tables: one per section that ran (in section order), then the checks."""
from bench.gpu_check.checks import fmt
from bench.gpu_check.sdpa import BF16_ATTENTION_REL_L2
from k4flash.published import NUM_STEPS
from parallel import cost


def section_tables(run, args) -> list:
    """(figures key, title, columns) of every table a section can fill, in report order."""
    return [
        ("model", "1. DiT at the geometry of the run", [
            ("config", "config", None), ("params_billion", "parameters (B)", ".3f"),
            ("weights_gib", "weights GiB", ".2f"), ("latent", "latent", None), ("tokens", "tokens", None),
            ("build_s", "build s", ".2f")]),
        ("backends", "2. SDPA backends against the math kernel (one forward, reduced geometry)", [
            ("compared", "compared", None), ("allowed", "default backends", None), ("kernel", "SDPA picks", None),
            ("latent", "latent", None), ("tokens", "tokens", None), ("math_scores_gib", "math S² scores GiB", ".2f"),
            ("max_abs_err", "max abs err", ".3g"), ("max_rel_err", "max abs err / max |ref|", ".3g"),
            ("rel_l2_err", "rel L2 err", ".3g"), ("finite", "finite", None)]),
        ("sdpa", f"2b. SDPA kernels alone: one attention at the run's geometry, against fp32 math at the reduced "
                 f"one (bound {BF16_ATTENTION_REL_L2:g} in bf16)", [
            ("kernel", "kernel", None), ("available", "available", None), ("dtype", "dtype", None),
            ("tokens", "tokens", None), ("median_s", "median s", ".4g"), ("min_s", "min s", ".4g"),
            ("rel_l2_err", "rel L2 err vs math", ".3g"), ("max_rel_err", "max abs err / max |ref|", ".3g"),
            ("within_bound", "within bound", None), ("fastest", "fastest within bound", None),
            ("note", "why unavailable", None)]),
        ("steps", f"3. DiT step (one forward) on {run.card}", [
            ("variant", "variant", None), ("median_s", "step median s", ".4f"), ("min_s", "min s", ".4f"),
            ("first_call_s", "first call s", ".2f"), ("tflops", "achieved TFLOP/s", ".3g"), ("mfu", "MFU", ".1%"),
            ("four_steps_s", f"{NUM_STEPS} steps s", ".3f"), ("output_finite", "finite", None)]),
        ("vae", "4. VAE decode (2 latent frames per chunk, uint8 frames on the host)", [
            ("latent", "latent", None), ("frames", "frames TxHxW", None), ("chunks", "chunks", None),
            ("build_s", "build s", ".2f"), ("first_call_s", "first call s", ".2f"),
            ("median_s", "median s", ".3f"), ("min_s", "min s", ".3f"), ("output_finite", "finite", None)]),
        ("memory", "5. Peak memory per stage (CUDA: allocated; CPU: process RSS)", [
            ("stage", "stage", None), ("start_gib", "at start GiB", ".2f"), ("peak_gib", "peak GiB", ".2f"),
            ("growth_gib", "peak - start GiB", ".2f")]),
        ("sampler", "6. Sampler host syncs: CUDA calls in the profile, then sync debug mode's warnings", [
            ("steps", "steps", None), ("profiler", "activities", None),
            ("syncs_before_loop", "before the loop", None), ("syncs_in_loop", "in the step loop", None),
            ("syncs_after_loop", "after the loop", None), ("dtoh_copies", "DtoH copies", None),
            ("warned_before_loop", "sync warnings before", None), ("warned_in_loop", "in the loop", None),
            ("warned_after_loop", "after", None), ("sampler_profiled_s", "profiled s", ".3f"),
            ("sampler_s", "unprofiled s", ".3f"), ("latents_finite", "finite", None)]),
        ("end_to_end", f"7. End-to-end estimate against the seed's {cost.SEED_CLAIM_S:g} s", [
            ("denoise", "denoise from", None), ("t5_s", "T5 s (cost model)", ".3f"),
            ("denoise_s", "denoise s", ".3f"), ("vae_s", "VAE s", ".3f"), ("total_s", "total s", ".3f"),
            ("vs_seed", "seed / total", ".2f")]),
        ("pipeline", f"10. One video end to end (random weights, seed 0), per text_encoder.offload, against the "
                     f"seed's {cost.SEED_CLAIM_S:g} s", [
            ("offload", "offload", None), ("video", "video", None), ("build_s", "build s", ".1f"),
            ("text_encode_s", "T5 s", ".3f"), ("denoise_s", "denoise s", ".3f"), ("decode_s", "decode s", ".3f"),
            ("write_s", "write s", ".3f"), ("total_s", "total s", ".3f"), ("vs_seed", "seed / total", ".2f"),
            ("peak_gib", "peak GiB", ".1f"), ("written", "written", None),
            ("latents_equal_none", "latents = none's", None), ("latents_finite", "finite", None)]),
        ("fp8", f"12. FP8 DiT (k4flash/fp8.py) against {str(run.dtype).replace('torch.', '')} on the same weights and "
                f"input, one step on {run.card}", [
            ("variant", "variant", None), ("median_s", "step median s", ".4f"), ("min_s", "min s", ".4f"),
            ("first_call_s", "first call s", ".2f"), ("speedup", "speed-up", ".2f"), ("mfu", "MFU", ".1%"),
            ("rel_l2_err", "rel L2 err vs eager ref", ".3g"), ("max_rel_err", "max abs err / max |ref|", ".3g"),
            ("weights_gib", "weights GiB", ".3g"), ("weights_ratio", "weights / ref's", ".3f"),
            ("peak_gib", "peak GiB", ".2f"), ("scaled_mm_calls", "_scaled_mm calls", None),
            ("scaled_mm_expected", "expected", None), ("fp8_flop_share", "FLOPs in FP8", ".1%"),
            ("fp8_skip", "fp8_skip", None), ("output_finite", "finite", None), ("note", "not run because", None)]),
        ("tp", f"8. Tensor parallel ({'NCCL' if run.device.type == 'cuda' else 'gloo'}, {run.config_name} DiT)", [
            ("tp", "tp", None), ("median_s", "step median s", ".4f"), ("min_s", "min s", ".4f"),
            ("speedup", "speed-up", ".2f"), ("max_rel_err", "max rel err vs tp=1", ".3g"),
            ("rel_l2_err", "rel L2 err vs tp=1", ".3g"), ("peak_gib", "peak GiB / rank", ".2f"),
            ("finite", "finite", None)]),
        ("plans", f"11. The other plans on {run.world} ranks against one rank "
                  f"({'NCCL' if run.device.type == 'cuda' else 'gloo'}, {run.config_name} DiT and VAE)", [
            ("plan", "plan", None), ("median_s", "median s", ".4f"), ("one_gpu_s", "one rank s", ".4f"),
            ("speedup", "speed-up", ".2f"), ("max_rel_err", "max rel err", ".3g"), ("rel_l2_err", "rel L2 err", ".3g"),
            ("max_frame_diff", "max frame diff (of 255)", None), ("frames", "frames TxHxW", None),
            ("peak_gib", "peak GiB / rank", ".2f"), ("finite", "finite", None), ("note", "not run because", None)]),
        ("faults", f"9. Faults on {run.world} ranks (parallel.timeout_s={args.fault_timeout_s:g})", [
            ("fault", "K4FLASH_TEST_FAULT", None), ("exit_status", "exit", None), ("capped", "capped", None),
            ("fault_to_exit_s", "fault → exit s", ".1f"), ("error_line", "rank 0's error line", None),
            ("outputs_left", "files left", None)]),
    ]


def add_tables(report, run, args, figures, memory_rows, checks: list) -> None:
    """One table per section that ran (a section that raised has its error line in the checks instead)."""
    figures = dict(figures, memory=memory_rows)
    for key, title, columns in section_tables(run, args):
        rows = figures.get(key)
        if rows:
            report.table(title, columns, rows if isinstance(rows, list) else [rows])
    report.table("Checks", [("check", "check", None), ("value", "value", fmt), ("bound", "bound", fmt),
                            ("passed", "passed", fmt)], checks)
