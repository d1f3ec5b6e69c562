"""Regenerate the tables of RESULTS.md from the study's MLflow store; the hand-written text stays as it is.

A table in RESULTS.md is the output of the `tdcompress compare` command written in the HTML comment
above it, up to the next ``<!-- end -->``:

    <!-- tdcompress compare --format markdown --plot '' --group-by method,format,keep_ratio -->
    | run | n | ... |
    <!-- end -->

This script reruns every such command against the study's store (``--tracking-uri`` is added, from
``--study-dir``) and writes the file back (atomically). Nothing in a table is typed by hand.

    python bench/results.py                      # /work/study/mlruns.db -> RESULTS.md
    python bench/results.py --check              # exit 1 if RESULTS.md differs from what the store gives
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- (tdcompress compare [^\n]*?) -->\n)(.*?)(<!-- end -->)", re.S)


def table(command: str, tracking_uri: str) -> str:
    """The markdown ``command`` prints against ``tracking_uri`` (its stdout, ending in a newline)."""
    argv = shlex.split(command)
    if "--tracking-uri" in argv or "--format" not in argv:
        raise SystemExit(f"RESULTS.md: {command!r}: give --format markdown and no --tracking-uri (added here)")
    exe = Path(sys.executable).with_name("tdcompress")
    argv = [str(exe) if exe.is_file() else "tdcompress", *argv[1:], "--tracking-uri", tracking_uri]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"RESULTS.md: {command!r} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout if out.stdout.endswith("\n") else out.stdout + "\n"


def render(text: str, tracking_uri: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + table(m.group(2), tracking_uri) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study-dir", type=Path, default=Path("/work/study"), help="holds the study's mlruns.db")
    p.add_argument("--file", type=Path, default=REPO / "RESULTS.md")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is out of date")
    args = p.parse_args(argv)
    db = args.study_dir.resolve() / "mlruns.db"
    if not db.is_file():
        p.error(f"--study-dir: no MLflow store {db}")
    text = args.file.read_text()
    if not BLOCK.search(text):
        p.error(f"--file: {args.file} has no '<!-- tdcompress compare ... -->' ... '<!-- end -->' block")
    new = render(text, f"sqlite:///{db}")
    if args.check:
        print("up to date" if new == text else f"{args.file} is out of date: run python bench/results.py")
        return 0 if new == text else 1
    fd, tmp = tempfile.mkstemp(dir=args.file.parent, prefix=".results-")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, args.file)
    print(f"wrote {args.file} ({len(BLOCK.findall(new))} tables from {db})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
