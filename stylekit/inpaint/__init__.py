"""Mask-bounded inpainting and editing.

The modules here that need no model (``images``, ``masks``, ``steps``) use numpy and Pillow only, so file
handling, mask geometry and colour steps are testable without torch. Pixels outside the mask are never
changed: ``masks.composite`` is always the last step and copies them from the original bit for bit.
"""
