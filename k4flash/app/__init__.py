"""The application on top of the library and parallel/: the Hydra config schema, the CLI that
`run_inference_distil.py` runs (checks, signals, exit statuses), and prompt batches."""
