"""Data: synthetic phantom, preprocessing to npy, datasets and transforms."""
