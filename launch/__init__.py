"""The application, i.e. the launcher, on top of the library (k4flash/) and the runtime (parallel/): the Hydra
config schema, the CLI split by job (checks, planning, lifecycle, generate, serve), prompt batches, the
server, the torchrun wrapper, and the shell and SLURM scripts beside them."""
