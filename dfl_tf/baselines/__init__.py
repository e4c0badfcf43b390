"""Baselines the heads are measured against: end-to-end fine-tuning of the backbone."""
