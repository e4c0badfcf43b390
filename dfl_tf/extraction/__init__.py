"""Extraction: the local runner, the core both runners share, and the Apache Beam runner."""
