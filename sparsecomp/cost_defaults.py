"""Cost model coefficients fitted on an H100 (``benchmarks/cost_model.py``), used on a GPU that has
no fit of its own yet. None until the fit is committed."""

H100_COST_MODEL = None
