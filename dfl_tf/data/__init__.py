"""Data in: sources, slide readers, the one decoder, views, tissue detection and tiling, splits."""
