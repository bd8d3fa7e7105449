"""Decode-step kernels: attention over selected tokens (split-K) and the selection scores beside it."""
