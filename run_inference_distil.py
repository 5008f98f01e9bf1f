"""Generate videos with Kandinsky 4.0 T2V Flash: a thin Hydra entry point over conf/.

    python run_inference_distil.py model=tiny                          # untrained tiny demo, any CPU
    python run_inference_distil.py prompt="..." seed=7                 # the published model from ./weights/
    torchrun --nproc-per-node 8 run_inference_distil.py prompts_file=prompts.txt output_dir=videos
"""
import sys

import hydra

from launch.cli import prepare_argv, run
from launch.config import register_configs

prepare_argv(sys.argv)  # drops torch.distributed.launch's --local-rank=N; keeps Hydra files to rank 0
register_configs()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()
