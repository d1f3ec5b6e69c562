"""`tdcompress configs list` / `configs copy NAME DEST`: the experiment configs shipped with the package.

Installed, they are the package data ``tdcompress/configs`` (pyproject.toml); in a source checkout (or an
editable install) the repository's ``configs/`` folder.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from launcher.schema import ConfigError


def configs_dir() -> Path:
    """Where the bundled configs are: the installed package's ``tdcompress/configs``, else the source tree's
    configs/ (a checkout, or an editable install, where ``tdcompress`` maps to a folder without them)."""
    try:
        from importlib.resources import files

        path = Path(str(files("tdcompress") / "configs"))
        if path.is_dir() and any(path.glob("*.yaml")):
            return path
    except (ImportError, TypeError, ValueError):  # not installed as a package
        pass
    return Path(__file__).resolve().parent.parent / "configs"


def bundled() -> dict[str, Path]:
    """Config name (path under configs/ without .yaml, e.g. ``quickstart``, ``study/admm_r20``) -> file."""
    root = configs_dir()
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def summary(path: Path) -> str:
    """The first comment line of a config: what it runs."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def _cmd_list(args: argparse.Namespace) -> int:
    found = bundled()
    width = max(map(len, found), default=0)
    for name, path in found.items():
        print(f"{name.ljust(width)}  {summary(path)}".rstrip())
    print(f"({len(found)} configs in {configs_dir()}; copy one with `tdcompress configs copy NAME DEST`)")
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    found = bundled()
    name = args.name[:-5] if args.name.endswith(".yaml") else args.name
    if name not in found:
        raise ConfigError(f"configs copy: no bundled config {args.name!r}; one of: {', '.join(found)}")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / found[name].name
    if not dest.parent.is_dir():
        raise ConfigError(f"configs copy: folder {dest.parent} does not exist; create it or choose another DEST")
    if dest.exists() and not args.force:
        raise ConfigError(f"configs copy: {dest} exists; pass --force to overwrite it")
    shutil.copyfile(found[name], dest)
    print(f"copied {name} -> {dest}; run it with: tdcompress run {dest}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list or copy the experiment configs shipped with tdcompress")
    csub = p.add_subparsers(dest="configs_command", required=True)
    ls = csub.add_parser("list", help="the bundled configs, with what each runs")
    ls.set_defaults(func=_cmd_list)
    cp = csub.add_parser("copy", help="copy a bundled config to edit it")
    cp.add_argument("name", help="a name from `tdcompress configs list`, e.g. quickstart or study/admm_r20")
    cp.add_argument("dest", help="file to write, or an existing folder (the config keeps its file name)")
    cp.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    cp.set_defaults(func=_cmd_copy)
