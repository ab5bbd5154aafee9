"""Labelling an image: preprocess, sliding window, postprocess, classify; label_image; file batches and the Dask batch."""
