"""A sweep file (YAML) -> validated, expanded rows; nothing runs here.

    name: r20-budget                  # tags every row's parent run: tdcompress.sweep = r20-budget
    storage: runs                     # cluster.storage of every row (relative: to the current directory)
    tracking_uri: sqlite:///mlruns.db # the rows' MLflow store (default: $MLFLOW_TRACKING_URI, else this)
    records: configs/study/records/r20-budget   # optional: each row's record is exported here when it ends
    overrides: [cluster.num_workers=2]          # every row, dense rows too
    dense:                            # optional: the parent run of each seed, run before the rows that start from it
      name: dense-r20-s{seed}
      config: configs/study/dense_resnet20.yaml
      seeds: [0, 1]
      weights: docs/records/r20-budget/parents/{name}   # optional: see below
    grids:                            # each grid is one cross product of its axes, times its seeds
      - name: "r20-{format}-{ratio}-{method}-b{budget}-s{seed}"
        config: configs/study/admm_r20.yaml     # default config of the grid's rows (an axis value's config wins)
        seeds: [0]
        axes:
          format: [tucker2, svd]      # a list of scalars: FIELD=VALUE (format, keep_ratio, or a dotted config key)
          method:                     # a mapping: label -> overrides, or {config, overrides, vars}
            admm: {config: configs/study/admm_r20.yaml, overrides: ["phases.0.epochs={admm_epochs}"]}
            direct: {config: configs/study/direct_r20.yaml, overrides: ["phases.1.epochs={budget}"]}
          budget:
            "5": {vars: {admm_epochs: 3}}

``dense.weights`` keeps each dense row's trained weights beside the records (a directory: model.safetensors
and manifest.json, BN not folded, written when the row finishes), and the grid rows start from that file.
With it committed, the study outlives the machine its runs were on: a dense row whose weights and record
are there counts as done (``recorded``), as does a grid row whose record is there, so a new machine runs
only what is missing.

Every override and row name may use ``{name}`` placeholders: each axis's label, the ``vars`` of the chosen
values, ``seed`` and ``sweep``. A grid row starts from its seed's dense row (``model.init``), which must be in
``dense.seeds``. Every mistake is a :class:`ConfigError` naming the field (``grids.0.axes.method.admm.config``)
and what is allowed, raised before anything runs; each row's config is loaded and validated too.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.schema import ConfigError

TOP_KEYS = ("name", "storage", "tracking_uri", "records", "overrides", "dense", "grids")
DENSE_KEYS = ("name", "config", "overrides", "seeds", "weights")
GRID_KEYS = ("name", "config", "overrides", "seeds", "axes")
VALUE_KEYS = ("config", "overrides", "vars")
SHORTHANDS = {"format": "compression.format", "keep_ratio": "compression.keep_ratio"}
PLAIN = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Row:
    """One run of the sweep: its run name, config file, seed, overrides and the dense row it starts from."""

    name: str
    config: str
    seed: int
    overrides: tuple[str, ...] = ()
    parent: str | None = None  # name of the dense row whose run is this row's model.init
    dense: bool = False
    weights: str | None = None  # dense rows: the directory its trained weights are kept in (dense.weights)


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    storage: str
    tracking_uri: str | None
    records: str | None
    rows: list[Row] = field(default_factory=list)


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _keys(data: Any, allowed: tuple[str, ...], where: str) -> dict:
    _need(isinstance(data, dict), where, f"expected a mapping with keys {', '.join(allowed)}, got {data!r}")
    bad = sorted(set(map(str, data)) - set(allowed))
    _need(not bad, f"{where}.{bad[0]}" if bad else where, f"unknown key; allowed keys: {', '.join(allowed)}")
    return data


def _str_list(value: Any, where: str) -> list[str]:
    value = [] if value is None else value
    _need(isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value), where,
          f"expected a list of key=value override strings, got {value!r}")
    return list(value)


def _seeds(value: Any, where: str, default: list[int] | None = None) -> list[int]:
    if value is None and default is not None:
        return default
    _need(isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                    for s in value) and len(set(value)) == len(value),
          where, f"expected a non-empty list of distinct integers >= 0, got {value!r}")
    return list(value)


def fill(text: str, variables: dict[str, Any], where: str) -> str:
    """``text`` with every ``{name}`` replaced by ``variables[name]``; other braces (YAML flow maps) stay."""
    def sub(m: re.Match) -> str:
        _need(m.group(1) in variables, where, f"{{{m.group(1)}}} is not defined; defined here: "
              f"{', '.join(sorted(variables))}")
        return str(variables[m.group(1)])

    return PLACEHOLDER.sub(sub, text)


def _config(value: Any, where: str, base: Path) -> str:
    _need(isinstance(value, str) and value.endswith((".yaml", ".yml")), where,
          f"expected the path of a YAML experiment file, got {value!r}")
    _need((base / value).is_file(), where, f"{value} does not exist (paths are relative to the current directory)")
    return value


def _axis(name: str, values: Any, where: str, base: Path) -> list[tuple[str, dict]]:
    """The (label, {config, overrides, vars}) choices of one axis."""
    _need(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name)), where, "axis names are identifiers "
          "(letters, digits, '_'; dotted for a config key)")
    if isinstance(values, list):
        key = SHORTHANDS.get(name, name)
        _need("." in key, where, f"a list of values needs a config key to set: name the axis format, keep_ratio or a "
              f"dotted config key, or give a mapping label -> overrides (got axis {name!r})")
        _need(bool(values) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values),
              where, f"expected a non-empty list of scalars, got {values!r}")
        return [(str(v), {"config": None, "overrides": [f"{key}={v}"], "vars": {}}) for v in values]
    _need(isinstance(values, dict) and bool(values), where,
          f"expected a list of values or a mapping label -> overrides, got {values!r}")
    out = []
    for label, v in values.items():
        at = f"{where}.{label}"
        _need(bool(PLAIN.fullmatch(str(label))), at, "labels are plain names (letters, digits, '-', '_', '.')")
        if v is None or isinstance(v, list):
            v = {"overrides": v}
        _keys(v, VALUE_KEYS, at)
        variables = v.get("vars") or {}
        _need(isinstance(variables, dict) and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k))
                                                  for k in variables), f"{at}.vars",
              f"expected a mapping identifier -> value, got {variables!r}")
        out.append((str(label), {"config": _config(v["config"], f"{at}.config", base) if v.get("config") else None,
                                 "overrides": _str_list(v.get("overrides"), f"{at}.overrides"), "vars": variables}))
    return out


def _grid_rows(grid: dict, where: str, sweep: str, common: list[str], dense_name: str | None,
               dense_seeds: list[int], base: Path) -> list[Row]:
    axes = grid.get("axes") or {}
    _need(isinstance(axes, dict) and bool(axes), f"{where}.axes", "expected a mapping axis -> values (one at least)")
    choices = {str(a): _axis(str(a), vals, f"{where}.axes.{a}", base) for a, vals in axes.items()}
    seeds = _seeds(grid.get("seeds"), f"{where}.seeds", dense_seeds or [0])
    default_config = _config(grid["config"], f"{where}.config", base) if grid.get("config") else None
    template = grid.get("name") or "-".join(f"{{{a}}}" for a in choices if "." not in a) + "-s{seed}"
    _need(isinstance(template, str), f"{where}.name", f"expected a string, got {template!r}")
    overrides = _str_list(grid.get("overrides"), f"{where}.overrides")
    if dense_name:
        missing = [s for s in seeds if s not in dense_seeds]
        _need(not missing, f"{where}.seeds", f"seeds {missing} have no dense row; dense.seeds: {dense_seeds}")
    rows = []
    for combo in itertools.product(*choices.values()):
        labels = {a.replace(".", "_"): label for a, (label, _) in zip(choices, combo)}
        configs = [c["config"] for _, c in combo if c["config"]]
        _need(len(set(configs)) <= 1, f"{where}.axes", f"two axis values set the config ({', '.join(configs)}); "
              "give it in one axis")
        config = configs[0] if configs else default_config
        _need(config is not None, f"{where}.config", "no config: give the grid a config or an axis value one")
        for seed in seeds:
            variables = {**labels, **{k: v for _, c in combo for k, v in c["vars"].items()}, "seed": seed,
                         "sweep": sweep}
            over = [*common, *overrides, *(o for _, c in combo for o in c["overrides"])]
            name = fill(template, variables, f"{where}.name")
            rows.append(Row(name=name, config=config, seed=seed,
                            overrides=tuple(fill(o, variables, f"{where} (row {name}) overrides") for o in over),
                            parent=fill(dense_name, {"seed": seed, "sweep": sweep}, "dense.name") if dense_name
                            else None))
    return rows


def load_sweep(path: str | Path, base: Path | None = None) -> Sweep:
    """Read and validate a sweep file; expand it into rows (dense rows first). Raises ConfigError."""
    path, base = Path(path), base or Path.cwd()
    _need(path.is_file(), "sweep file", f"{path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file: {path} is not valid YAML ({e})") from None
    _keys(data, TOP_KEYS, "sweep")
    name = data.get("name")
    _need(isinstance(name, str) and bool(PLAIN.fullmatch(name)), "name",
          f"expected a plain name (letters, digits, '-', '_', '.'), got {name!r}")
    for key in ("storage", "tracking_uri", "records"):
        _need(data.get(key) is None or isinstance(data[key], str), key, f"expected a string, got {data.get(key)!r}")
    common = _str_list(data.get("overrides"), "overrides")
    rows: list[Row] = []
    dense_name, dense_seeds = None, []
    if data.get("dense") is not None:
        d = _keys(data["dense"], DENSE_KEYS, "dense")
        dense_seeds = _seeds(d.get("seeds"), "dense.seeds")
        dense_name = d.get("name") or "dense-s{seed}"
        _need(isinstance(dense_name, str) and "{seed}" in dense_name, "dense.name",
              f"expected a name with {{seed}} in it (one dense run per seed), got {dense_name!r}")
        config = _config(d.get("config"), "dense.config", base)
        over = _str_list(d.get("overrides"), "dense.overrides")
        weights = d.get("weights")
        _need(weights is None or (isinstance(weights, str) and "{name}" in weights), "dense.weights",
              f"expected a directory with {{name}} in it (one per dense row), got {weights!r}")
        for seed in dense_seeds:
            variables = {"seed": seed, "sweep": name}
            row_name = fill(dense_name, variables, "dense.name")
            rows.append(Row(name=row_name, config=config, seed=seed,
                            overrides=tuple(fill(o, variables, "dense.overrides") for o in [*common, *over]),
                            dense=True,
                            weights=fill(weights, {**variables, "name": row_name}, "dense.weights") if weights
                            else None))
    grids = data.get("grids") or []
    _need(isinstance(grids, list), "grids", f"expected a list of grids, got {grids!r}")
    for i, grid in enumerate(grids):
        _keys(grid, GRID_KEYS, f"grids.{i}")
        rows += _grid_rows(grid, f"grids.{i}", name, common, dense_name, dense_seeds, base)
    _need(bool(rows), "grids", "the sweep has no rows (give dense and/or grids)")
    seen: dict[str, int] = {}
    for r in rows:
        _need(bool(PLAIN.fullmatch(r.name)), "name", f"row name {r.name!r} is not a plain name")
        seen[r.name] = seen.get(r.name, 0) + 1
    dup = [n for n, c in seen.items() if c > 1]
    _need(not dup, "grids", f"rows {dup} appear more than once: put every axis's label in the grid's name")
    return Sweep(name=name, path=path, storage=data.get("storage") or "runs", tracking_uri=data.get("tracking_uri"),
                 records=data.get("records"), rows=rows)
