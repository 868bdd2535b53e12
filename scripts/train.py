"""Train a LoRA.

python scripts/train.py model=flux data=tile trainer.max_steps=2000
python scripts/train.py -m lora.rank=4,8,16 optimizer.lr=1e-4,3e-4
"""

import hydra
from omegaconf import DictConfig

from stylekit.app import one_line_composition_errors, run_task


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_task("train", cfg)


if __name__ == "__main__":
    with one_line_composition_errors():  # model=nope, a mistyped key: one line, exit code 2
        main()
