"""Checkpoint readers shared by the backbone families: torch pickles (no torch), safetensors,
and the copy of a torch state dict into Keras layers."""
