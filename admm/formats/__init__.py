"""One module per compression format: the projections onto each format's set, the reshapes they
work in, HOOI and CP-ALS, low-rank + sparse, and the warm starts kept between Z-updates.

Import the modules themselves: ``admm.formats.cp_als``, ``hooi``, ``lowrank_sparse``, ``projections``,
``projections_base``, ``reshape``, ``warm``."""
