"""Synthetic CT angiography phantoms and the demo built on them."""
