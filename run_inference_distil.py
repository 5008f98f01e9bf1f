"""Generate a video with Kandinsky 4.0 T2V Flash: a thin Hydra entry point over conf/.

    python run_inference_distil.py model=tiny                 # untrained tiny demo, any CPU
    python run_inference_distil.py prompt="..." seed=7        # the published model from ./weights/
"""
import sys

import hydra

from k4flash.cli import run, strip_launcher_args

strip_launcher_args(sys.argv)  # torch.distributed.launch passes --local-rank=N, which Hydra would reject


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()
