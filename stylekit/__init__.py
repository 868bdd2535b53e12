"""stylekit: LoRA finetuning and mask-bounded editing for diffusion models."""
