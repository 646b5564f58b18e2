"""Triton kernels, each beside its torch reference; imported as ``dsv3lab.kernels``."""
