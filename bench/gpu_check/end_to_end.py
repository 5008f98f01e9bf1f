"""Section 7: an end-to-end estimate of one video, T5 from the cost model plus the measured steps and decode,
against the seed's 11 s on one H100."""
from k4flash.published import NUM_STEPS
from parallel import cost


def end_to_end_rows(step_rows, sampler_row, vae_row):
    """T5 (cost model: T5-XXL on an H100, weights read once) + 4 steps + the decode, per way of stepping."""
    t5_s = cost.predict(vae=dict(conv_flops=0, elementwise_bytes=0))["t5_s"]
    denoise = [(f"{NUM_STEPS} x step median, {row['variant']}", NUM_STEPS * row["median_s"]) for row in step_rows]
    if sampler_row:
        denoise.append(("sample() measured, eager", sampler_row["sampler_s"]))
    rows = []
    for label, denoise_s in denoise:
        total = t5_s + denoise_s + vae_row["median_s"]
        rows.append(dict(denoise=label, t5_s=t5_s, denoise_s=denoise_s, vae_s=vae_row["median_s"], total_s=total,
                         seed_claim_s=cost.SEED_CLAIM_S, vs_seed=cost.SEED_CLAIM_S / total))
    return rows
