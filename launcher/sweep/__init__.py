"""`tdcompress sweep`: a declarative grid of runs (spec.py), as `tdcompress run` commands (rows.py), run on this
machine one at a time (run.py) or as Ray Jobs on a cluster (jobs.py); the command line is cli.py."""
