"""One module per compression format: the projections onto each format's set, the reshapes they
work in, HOOI and CP-ALS, low-rank + sparse, and the warm starts kept between Z-updates."""
