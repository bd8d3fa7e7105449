"""Tuning: the cost model and its shipped fits, autotune and its per-GPU cache, GPU timing."""
