"""The `generated` dataset (dataset.py) and the GLASS pipeline that makes it: images from a
text-to-image model (generate.py), prompts and captions (captions.py) and pseudo masks from
its attention (pseudo_masks.py)."""
