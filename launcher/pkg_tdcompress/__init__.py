"""The ``tdcompress`` import name (pyproject maps it to this folder): ``python -m tdcompress`` runs the CLI, and
the installed package carries the experiment configs as ``tdcompress/configs`` (see launcher/configs_cli.py)."""
