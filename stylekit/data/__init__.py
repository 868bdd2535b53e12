"""Model-free training data: image folders and captions to records (dataset.py), or rows of a Hugging Face `datasets`
dataset to records (hub.py); records to samples (transforms.py).

Nothing here imports diffusers or transformers, so a bad dataset is reported before any model is loaded.
"""
