"""Slide-level heads on bags of stored embeddings: bags and slide labels (``bags``), the attention
MIL / mean / max head (``model``), training (``train``). Submodules are imported lazily."""
