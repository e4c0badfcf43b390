"""Backbone selection: the proxy-task protocol and embedding maps."""
