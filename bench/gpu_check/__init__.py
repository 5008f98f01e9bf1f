"""The GPU acceptance check: one command measures and checks, on the day a GPU is at hand, what the CPU suite cannot.

    python -m bench.gpu_check [--out DIR] [--json F] [--md F]   # needs CUDA; ~14 min on one H100 (estimates)
    python -m bench.gpu_check --gpus 8 --out DIR                # + tensor parallel and NCCL faults on 8 GPUs
    python -m bench.gpu_check --smoke [--json F] [--md F]       # the same code paths on the CPU (tiny, fp32; CI)
    python -m bench.gpu_check --smoke --gpus 2 --fault-timeout-s 8   # + sections 8 and 9 on 2 gloo ranks (~1 min)

Options: --sections dit,backends,sampler,vae,pipeline,fp8,tp,plans,faults (default all, in that order), --budget-s S
(skip a section whose estimate no longer fits, stop one that overruns), --no-compile (~9 min: the compiles leave
the estimates too), --no-faults, --gpus 1 (skip 8 and 9), --repeats / --warmup / --vae-repeats, --fault-timeout-s,
--peak-tflops (else bench/gpu_check/peaks.py by card name), --compile-backend (default inductor; aot_eager with
--smoke, where inductor's C++ compile costs 5-30 s).

Each section runs in a process of its own (child.py), and the report (--out DIR, default gpu_check_report/) is
rewritten after each: a crash, a sticky CUDA error, an OOM kill or a timeout costs its own section only, and a run
cut short at any point leaves a valid report of every finished section.

On one GPU (cuda:0), with random weights (no checkpoint needed):
  1. the published DiT (5.5 B parameters; bench.random_weights.build_random_dit, bf16, built on the GPU) at the
     published geometry: 12 s at 672x384 → latent 25 x 48 x 84 → 25,200 visual + 224 text tokens;
  2. SDPA backends: the model's default (dit_math.DEFAULT_SDPA_BACKENDS) against the math kernel, one forward
     in fp32 (TF32 off) at a reduced geometry (3 latent frames: math attention materialises the S x S scores,
     S² · heads · 4 B = 1.9 GiB there, 116 GiB at the full size), and bf16 autocast with the default backends
     against the same fp32 math forward: the fidelity bound of bf16. Which kernel the default picks is probed;
     2b. each kernel alone (cuDNN, flash, efficient) timed at the run's geometry and checked against math;
  3. step latency (one DiT forward = one denoising step), eager and compile_blocks'd: CUDA events, median of
     --repeats after --warmup, achieved TFLOP/s from parallel.cost.dit_flops;
  4. the VAE decode of 12 s at 672x384 (AutoencoderKLCogVideoX() defaults = the published config, built on
     meta, materialised on the GPU in bf16, random weights) through k4flash.vae.decode_latents: 2 latent
     frames per chunk, uint8 frames on the host, as the pipeline decodes;
  5. peak GPU memory per stage (max_memory_allocated after a reset at the stage's start; the DiT stays
     resident through every stage, as in the pipeline);
  6. the sampler (k4flash.sampler.sample: all noise drawn up front, one pinned copy) driving the DiT as the
     pipeline does, under torch.profiler with CUDA activity: host syncs (cuda/cu Stream/Device/Event/Ctx
     Synchronize and blocking Memcpy calls) before, inside and after the step loop, told apart by markers
     in the velocity call and in on_step; then once more, timed, under torch.cuda.set_sync_debug_mode("warn"),
     whose warnings count the same syncs without the profiler. Expected: none in the loop, one after it
     (the finite check's copy of the per-step flags);
  10. (pipeline) one video end to end with random weights, per text_encoder.offload: T5 at the published T5-XXL
     shape, the DiT, the VAE, `generate` and the writers (PNG frames where no MP4 encoder is installed); stage
     times, peak memory, each mode's latents against offload=none's;
  12. (fp8) the FP8 DiT (k4flash.fp8.quantize_dit, dit.fp8_skip's default) against bf16 on the same weights and
     input: step latency eager and compiled, speed-up, output error, weight bytes, peak memory, MFU at the card's
     fp8 and bf16 peaks, and the aten._scaled_mm calls of one forward (one per quantized layer: FP8 ran);
  7. an end-to-end estimate: T5-XXL from the cost model + 4 measured steps + the measured decode, against
     the seed's 11 s on one H100 (cost.SEED_CLAIM_S).
On N GPUs (--gpus N, default: every visible GPU when there are several):
  8. tp = N: the published DiT on N NCCL ranks (parallel.spawn.run_ranks), the same weights on every rank
     (broadcast from rank 0), the sharded forward against the one-GPU forward at the published geometry
     (bf16, relative error) and the speed-up of a step over tp = 1 measured in the same processes;
  11. (plans) sequence-parallel TP, Ulysses (and Ulysses x TP from 4 GPUs) and the row-split VAE decode, each on
     N ranks against one: error, speed-up, max frame difference;
  9. NCCL faults: `python -m launch.torchrun --standalone --nproc-per-node N tests/fault_worker.py
     model=tiny time_length=0 width=512 height=512 progress=false device=cuda parallel.timeout_s=60` with
     K4FLASH_TEST_FAULT = kill:1:2, hang:1:2, stop:1:2, raise:1:3 (tests/fault_worker.py injects it from
     outside the product), each capped at --fault-cap-s: exit status, seconds from the fault line to the
     exit, rank 0's `error:` line. The tiny weights are built in a temporary K4FLASH_CACHE, offline.

A last table checks the figures against bounds (finite outputs, kernel and bf16 errors, no sync in the step loop,
the estimate under the seed's 11 s, offload modes equal, tp parity and speed-up, each fault named and bounded; a
section that failed or whose process died fails its own check).
Exit status: 0 when every check passes, 1 when one fails, 2 without CUDA and without --smoke.
`--smoke` (= --device cpu) runs sections 1-7, 10 and 12 with the tiny config (k4flash.tiny) at a tiny geometry in
fp32: no CUDA events, so the sync counts are 0 by construction and GPU-only checks read "-"; with
`--gpus N` it also runs 8 and 9 on N gloo ranks.

One module per measurement, each exposing the one function that computes its rows: model.py (1), backends.py
(2), sdpa.py (2b), steps.py (3), vae.py (4), memory.py (5), sampler.py (6), end_to_end.py (7), tp.py (8),
faults.py (9), pipeline.py (10), plans.py (11), fp8.py (12); sections.py groups them into the units that run each
in its own process (child.py), checks.py gives the verdicts, tables.py lays out the report, peaks.py knows the
cards, command.py is the command line, the budget and the report after each section (run.py: the configs and what a
run measures on).
"""
