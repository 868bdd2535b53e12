"""Training: the LoRA finetuning loop and what keeps its runs safe (checkpoints, resume, signals)."""
