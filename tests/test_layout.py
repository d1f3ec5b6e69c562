"""One source for every name list, and the component contract.

The config's ``Literal`` types are the lists of allowed names (and what a bad
value's error message offers); each registry that acts on a name is keyed by
the same list. The import direction itself is checked by import-linter
(pyproject.toml, run by `make test`).
"""
from __future__ import annotations

import ast
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
