"""One source for every name list, and the component contract.

The config's ``Literal`` types are the lists of allowed names (and what a bad
value's error message offers); each registry that acts on a name is keyed by
the same list. The import direction itself is checked by import-linter
(pyproject.toml, run by `make test`).
"""
from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest

from admm.admm_component import AdmmComponent
from admm.config import FORMATS, AdmmConfig, CompressionConfig
from admm.formats.projections import PROJECTIONS
from admm.nn.layers import FACTORED_LAYERS
from admm.planning.model_plan import plan_for_model
from trainer.config import (
    DATASET_NAMES,
    MODEL_NAMES,
    PHASE_KINDS,
    TRAINING_PHASES,
    DataConfig,
    FailAt,
    ModelConfig,
    PhaseConfig,
)
from trainer.core.component import Component
from trainer.core.faults import FailureInjector
from trainer.data import DATASETS
from trainer.models import MODEL_BUILDERS, build_model
from trainer.phases import PHASES

REPO = Path(__file__).resolve().parents[1]


def _allowed(cls: type, field: str) -> tuple:
    return typing.get_args(typing.get_type_hints(cls)[field])


@pytest.mark.parametrize("allowed, registry", [
    (_allowed(ModelConfig, "name"), MODEL_BUILDERS),
    (_allowed(DataConfig, "dataset"), DATASETS),
    (_allowed(PhaseConfig, "kind"), PHASES),
    (_allowed(CompressionConfig, "format"), PROJECTIONS),
    (_allowed(CompressionConfig, "format"), FACTORED_LAYERS),
], ids=["models", "datasets", "phases", "projections", "factored-layers"])
def test_schema_and_registries_agree(allowed, registry):
    assert tuple(registry) == allowed


def test_name_tuples_are_the_literals():
    assert MODEL_NAMES == _allowed(ModelConfig, "name")
    assert DATASET_NAMES == _allowed(DataConfig, "dataset")
    assert PHASE_KINDS == _allowed(PhaseConfig, "kind")
    assert FORMATS == _allowed(CompressionConfig, "format")
    assert set(TRAINING_PHASES) < set(PHASE_KINDS)


def test_components_meet_the_contract(tmp_path: Path):
    model = build_model("tinycnn", 10)
    plan = plan_for_model(model, CompressionConfig(format="svd", exclude=[], min_channels=3))
    admm = AdmmComponent(plan, AdmmConfig(), rank=0, world=1, grad_accum=1, log=lambda m, s: None)
    injector = FailureInjector(FailAt(phase=0, epoch=1), 0, tmp_path, rank=0)
    for comp in (admm, injector):
        assert isinstance(comp, Component), type(comp).__name__
    assert admm.name != injector.name  # their checkpoint keys


def _imports_and_calls(path: Path) -> tuple[set[str], set[str]]:
    """The modules ``path`` imports and the plain names and attributes it calls."""
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    called: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call):
            f = node.func
            called.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return imported, called


def test_admm_runs_no_collectives_and_no_io():
    """admm is method code: communication and I/O are handed in by the trainer (a comm, a log callable)."""
    for path in sorted((REPO / "admm").rglob("*.py")):
        imported, called = _imports_and_calls(path)
        assert not any(m == "torch.distributed" or m.startswith("torch.distributed.") for m in imported), path
        assert not {"print", "open", "write_text", "write_bytes", "savefig", "mkdir"} & called, path


def test_no_private_name_is_imported_across_modules():
    """A leading underscore means "this module only": another module that needs the name needs it public.

    Product code only: a test may reach into a module to check one of its helpers.
    """
    ours = ("launcher", "cluster", "trainer", "admm", "bench")
    found = []
    for path in sorted(p for d in ours for p in (REPO / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ours:
                found += [f"{path.relative_to(REPO)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


PACKAGES = ("launcher", "cluster", "trainer", "admm")
MAX_MODULES = 10  # modules directly in one package directory, __init__.py not counted
MAX_LINES = 300  # lines of one module
MAX_FUNCTION_LINES = 60  # lines of one function, unless a "# long: <reason>" comment stands above its def
# Modules allowed past MAX_LINES, each with why it stays whole.
LONG_MODULES = {
    "trainer/checkpoints/files.py": "the writer and the reader of one file layout; apart, each would restate it",
    "admm/nn/layers.py": "the factored layer of each matrix/Tucker/CP format beside the dispatch over them",
    "admm/planning/planner.py": "plan_ranks and both allocations share one budget (_Budget) and its cost functions",
    "bench/zupdate.py": "the Z-update's three benchmarks (sharding, HOOI warm starts, CP) share its model and timing",
}


def _package_dirs() -> list[Path]:
    return sorted(init.parent for top in PACKAGES for init in (REPO / top).rglob("__init__.py"))


def _modules() -> list[Path]:
    return sorted(p for top in (*PACKAGES, "bench") for p in (REPO / top).rglob("*.py"))


def test_package_directories_hold_about_ten_modules():
    """A package that grows past about ten modules gets sub-packages, one concern each."""
    crowded = {str(d.relative_to(REPO)): n for d in _package_dirs()
               if (n := len([p for p in d.glob("*.py") if p.name != "__init__.py"])) > MAX_MODULES}
    assert not crowded, f"more than {MAX_MODULES} modules directly in: {crowded}"


def test_modules_stay_under_about_300_lines():
    long = {str(p.relative_to(REPO)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG_MODULES), f"over {MAX_LINES} lines: {sorted(set(long) - set(LONG_MODULES))}"
    assert set(long) == set(LONG_MODULES), f"no longer long, drop from LONG_MODULES: {set(LONG_MODULES) - set(long)}"


def test_long_functions_say_why():
    """A function over MAX_FUNCTION_LINES lines has a one-line reason (``# long: ...``) just above its def."""
    unexplained = []
    for path in _modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
                        and not lines[first - 2].strip().startswith("# long: ")):
                    unexplained.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not unexplained, unexplained


def test_setuptools_lists_every_package():
    """pyproject.toml names the packages one by one: a sub-package missing there is missing from the wheel."""
    block = re.search(r"^packages = (\[.*?\])", (REPO / "pyproject.toml").read_text(), re.M | re.S)
    listed = set(ast.literal_eval(block.group(1)))
    ours = {".".join(d.relative_to(REPO).parts) for d in _package_dirs() if "pkg_tdcompress" not in d.parts}
    assert ours <= listed, sorted(ours - listed)
