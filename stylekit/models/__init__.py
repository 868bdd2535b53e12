"""Model families: one module per base model (flux, sdxl, qwen_edit) plus offline tiny models (tiny)."""
