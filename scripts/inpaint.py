"""Edit only the masked region of images.

python scripts/inpaint.py model=qwen_edit prompt="floral dress" image=photo.jpg mask=mask.png
"""

import hydra
from omegaconf import DictConfig

from stylekit.app import run_task


@hydra.main(version_base="1.3", config_path="../conf", config_name="inpaint")
def main(cfg: DictConfig) -> None:
    return run_task("inpaint", cfg)


if __name__ == "__main__":
    main()
