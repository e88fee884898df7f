"""Triton kernels for minilora (installed as minilora.kernels)."""
