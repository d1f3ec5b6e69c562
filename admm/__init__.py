"""The method: ADMM-constrained low-tensor-rank training (projections, accounting, ...)."""
