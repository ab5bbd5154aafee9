"""Models: the model card, the registry of model folders (built-in ones in models/), MONAI bundles and their export."""
