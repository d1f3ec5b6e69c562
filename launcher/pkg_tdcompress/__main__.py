"""``python -m tdcompress``: the same as the ``tdcompress`` console command."""
import sys

from launcher.cli import console

sys.exit(console())
