"""Serving: SavedModel export, the parity check, prediction and slide heatmaps."""
