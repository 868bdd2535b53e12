"""Edit only the masked region of images.

python scripts/inpaint.py model=qwen_edit prompt="floral dress" image=photo.jpg mask=mask.png
"""

import hydra
from omegaconf import DictConfig

from stylekit.app import one_line_composition_errors, run_task


@hydra.main(version_base="1.3", config_path="../conf", config_name="inpaint")
def main(cfg: DictConfig) -> None:
    return run_task("inpaint", cfg)


if __name__ == "__main__":
    with one_line_composition_errors():  # model=nope, a mistyped key: one line, exit code 2
        main()
