"""Model-free training data: image folders and captions to records (dataset.py), records to samples (transforms.py).

Nothing here imports diffusers or transformers, so a bad dataset is reported before any model is loaded.
"""
