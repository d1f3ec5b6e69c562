"""Tucker-2 by (warm-started) HOOI, warm-started CP-ALS, and their state in ADMM checkpoints."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from admm.admm_component import AdmmComponent
from admm.config import AdmmConfig, CompressionConfig
from admm.formats.hooi import hooi_factors, tucker2_reconstruct
from admm.formats.projections import HOOI_SWEEPS, max_rank, project, project_tucker2
from admm.formats.reshape import to_3way
from admm.formats.warm import ProjectionOptions, project_warm
from admm.planning.model_plan import plan_for_model
from launcher.config import ConfigError, load_config
from trainer.models import build_model

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()  # small eigh/SVD calls: one thread is fastest on a loaded box
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_like(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A kernel whose spectrum decays along both channel modes, as trained convs' do (Gaussian: flat)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    decay_out = torch.logspace(0, -1.5, shape[0])
    decay_in = torch.logspace(0, -1.5, shape[1])
    return w * decay_out[:, None, None, None] * decay_in[None, :, None, None]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def small_step(w: torch.Tensor, size: float, seed: int = 1) -> torch.Tensor:
    """W plus a random change of norm ``size * ||W||`` (the drift between two Z-updates)."""
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    return w + size * w.norm() * noise / noise.norm()


SHAPES_RANKS = [((32, 16, 3, 3), (8, 4)), ((48, 48, 3, 3), (16, 20)), ((64, 32, 1, 1), (12, 12)), ((24, 40), (6, 9))]


@pytest.mark.parametrize(("shape", "rank"), SHAPES_RANKS)
def test_hooi_error_at_most_hosvd_and_non_increasing(shape, rank):
    for w in (torch.randn(shape, generator=torch.Generator().manual_seed(0)), trained_like(shape)):
        errors = [rel(project_tucker2(w, rank, n_iter=n), w) for n in (0, 1, 2, 5, 20)]
        assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    # On the flat-spectrum weight HOOI gains something measurable over HOSVD (not a no-op).
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if len(shape) == 4 and shape[2] > 1:
        assert rel(project_tucker2(w, rank, n_iter=20), w) < rel(project_tucker2(w, rank, n_iter=0), w) - 1e-4


def test_hooi_iterates_are_tensorlys():
    """The torch HOOI runs the iteration of tensorly's partial_tucker (what the TT-ADMM code calls)."""
    w3 = to_3way(torch.randn(40, 24, 3, 3, generator=torch.Generator().manual_seed(2)).double())
    for sweeps in (0, 1, 4):
        core, u_out, u_in, done = hooi_factors(w3, (10, 7), sweeps)
        assert done == sweeps
        with tl.backend_context("pytorch"):
            (tcore, factors), _ = partial_tucker(w3, rank=[10, 7], modes=[0, 1], n_iter_max=sweeps, init="svd", tol=0)
            ref = tl.tenalg.multi_mode_dot(tcore, factors, modes=[0, 1])
        assert rel(tucker2_reconstruct(core, u_out, u_in), ref) < 1e-8


@pytest.mark.parametrize("step", [1e-3, 1e-2])
def test_warm_start_reaches_cold_100_sweeps_within_1pct_in_3_sweeps(step):
    shape, rank = (64, 48, 3, 3), (20, 16)
    # A flat spectrum, where HOSVD is 3.7% worse than converged HOOI, so "within 1%" separates them.
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    _, prev = project_warm(w, "tucker2", rank, None, ProjectionOptions(hooi_sweeps=100))  # the last Z-update
    w2 = small_step(w, step)
    cold = rel(project_tucker2(w2, rank, n_iter=100), w2)
    hosvd = rel(project_tucker2(w2, rank, n_iter=0), w2)
    warm = [rel(project_warm(w2, "tucker2", rank, prev, ProjectionOptions(hooi_sweeps=k))[0], w2) for k in (1, 2, 3)]
    assert hosvd > 1.02 * cold  # a cold restart would not pass
    assert max(warm) <= 1.01 * cold, (warm, cold)
    # the default sweep count is enough, and beats a cold HOSVD restart
    assert warm[HOOI_SWEEPS - 1] <= 1.01 * cold and warm[HOOI_SWEEPS - 1] <= hosvd + 1e-7, (warm, cold, hosvd)


def test_warm_subspace_iteration_converges_across_updates():
    """One sweep per update from HOSVD, over a few updates of a slowly moving W, reaches 100 cold sweeps."""
    shape, rank = (48, 48, 3, 3), (12, 12)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(4))  # flat spectrum: HOOI matters most
    warm = None
    for i in range(6):
        w = small_step(w, 1e-3, seed=10 + i)
        z, warm = project_warm(w, "tucker2", rank, warm, ProjectionOptions(hooi_sweeps=1))
    assert rel(z, w) <= 1.01 * rel(project_tucker2(w, rank, n_iter=100), w)


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (64, 32, 1, 1), (10, 64)])
@pytest.mark.parametrize("n_iter", [0, 1, 5])
def test_tucker2_and_svd_idempotent_to_round_off(shape, n_iter):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    full = max_rank(shape, "tucker2")
    rank = (max(1, full[0] // 3), max(1, full[1] // 2))
    z = project_tucker2(w, rank, n_iter=n_iter)
    assert rel(project_tucker2(z, rank, n_iter=n_iter), z) < 1e-5
    z_svd = project(w, "svd", rank[0])
    assert rel(project(z_svd, "svd", rank[0]), z_svd) < 1e-5
    # warm: re-projecting Z from its own factors returns it
    z_w, state = project_warm(w, "tucker2", rank, None, ProjectionOptions(hooi_sweeps=max(1, n_iter)))
    assert rel(project_warm(z_w, "tucker2", rank, state, ProjectionOptions(hooi_sweeps=1))[0], z_w) < 1e-5


@pytest.mark.parametrize(("shape", "rank"), [((32, 32, 3, 3), 63), ((64, 64, 3, 3), 134)])
def test_cp_warm_started_returns_its_own_output(shape, rank):
    """Cold ALS is only approximate (project_cp's docstring); from Z's own factors it is a projection."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    opts = ProjectionOptions(cp_sweeps=5)
    z, state = project_warm(w, "cp", rank, None, opts)
    z2, state2 = project_warm(z, "cp", rank, state, opts)
    assert rel(z2, z) < 1e-4
    # warm sweeps keep lowering the error of the same W
    z3, _ = project_warm(w, "cp", rank, state, opts)
    assert rel(z3, w) < rel(z, w)


def test_warm_state_of_another_rank_is_refused():
    w = torch.randn(32, 16, 3, 3)
    _, state = project_warm(w, "tucker2", (8, 4))
    with pytest.raises(ValueError, match="do not fit"):
        project_warm(w, "tucker2", (8, 5), state)
    _, state = project_warm(w, "cp", 6)
    with pytest.raises(ValueError, match="do not fit"):
        project_warm(w, "cp", 7, state)
    assert project_warm(w, "svd", 4)[1] == {}  # exact formats keep no state


def _component(fmt: str, model: torch.nn.Module, world: int = 1, rank: int = 0) -> AdmmComponent:
    cc = CompressionConfig(format=fmt, keep_ratio=0.5, exclude=[], min_channels=3)
    comp = AdmmComponent(plan_for_model(model, cc, world), AdmmConfig(rho=0.1, hooi_sweeps=1, cp_sweeps=2),
                         rank=rank, world=world, grad_accum=1, log=lambda m, s: None)
    comp.prepare(model, 0.0)
    return comp


def _nudge(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * p.std() * torch.randn(p.shape, generator=g))


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("fmt", ["tucker2", "cp"])
def test_resume_restores_warm_factors_and_the_next_z(fmt):
    torch.manual_seed(0)
    model = build_model("tinycnn", 10)
    a = _component(fmt, model)
    a.attach(model)
    for i in range(2):
        _nudge(model, i)
        a.z_update(i)
    saved = _round_trip(a.state_dict())
    iterative = [p.name for p in a.plan.layers if p.fmt == fmt]  # (1x1 / Linear layers may be planned as svd)
    assert iterative and all(saved["layers"][n]["warm"] for n in iterative)  # the factors are in the checkpoint
    b = _component(fmt, model)
    b.load_state_dict([saved])
    b.attach(model)
    cold = _component(fmt, model)  # an old checkpoint without factors: the projection restarts cold
    cold.load_state_dict([{**saved, "layers": {n: {"z": d["z"], "u": d["u"]} for n, d in saved["layers"].items()}}])
    cold.attach(model)
    _nudge(model, 7)
    for c in (a, b, cold):
        c.z_update(3)
    moved = 0.0
    for name, s in a.state.layers.items():
        assert torch.equal(b.state.layers[name].z, s.z) and torch.equal(b.state.layers[name].u, s.u)
        for key, t in s.warm.items():
            assert torch.equal(b.state.layers[name].warm[key], t)
        moved = max(moved, rel(cold.state.layers[name].z, s.z))
    assert moved > 1e-6  # the warm factors matter: without them the next Z differs


def test_warm_factors_follow_their_layer_when_resharded():
    torch.manual_seed(0)
    model = build_model("tinycnn", 10)
    one = _component("tucker2", model)
    one.attach(model)
    one.z_update(1)
    saved = _round_trip(one.state_dict())
    owned = set()
    for r in range(2):
        c = _component("tucker2", model, world=2, rank=r)
        c.load_state_dict([saved])
        owned |= set(c.state.layers)
        for name, s in c.state.layers.items():
            assert s.warm.keys() == saved["layers"][name]["warm"].keys()
            assert all(torch.equal(t, saved["layers"][name]["warm"][k]) for k, t in s.warm.items())
            assert s.warm or s.fmt != "tucker2"
    assert owned == set(saved["layers"])


def test_config_defaults_are_the_projection_defaults():
    cfg, opts = AdmmConfig(), ProjectionOptions()
    assert (cfg.hooi_sweeps, cfg.hooi_tol, cfg.cp_sweeps, cfg.cp_tol) == dataclasses.astuple(opts)


@pytest.mark.parametrize(("override", "key"), [
    ("admm.hooi_sweeps=0", "admm.hooi_sweeps"),
    ("admm.hooi_sweeps=2.5", "admm.hooi_sweeps"),
    ("admm.hooi_tol=-0.1", "admm.hooi_tol"),
    ("admm.cp_sweeps=0", "admm.cp_sweeps"),
    ("admm.cp_tol=1.5", "admm.cp_tol"),
])
def test_bad_sweep_settings_are_refused_with_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(QUICKSTART, [override])
    section, field = key.split(".")
    value = override.split("=")[1]
    with pytest.raises(ValueError, match=field):
        AdmmConfig(**{field: float(value) if "." in value or "-" in value else int(value)})


def test_hooi_warm_start_needs_a_sweep():
    w3 = torch.randn(16, 8, 9)
    _, u_out, u_in, _ = hooi_factors(w3, (4, 4), 1)
    with pytest.raises(ValueError, match="sweeps >= 1"):
        hooi_factors(w3, (4, 4), 0, init=(u_out, u_in))


def test_peer_config_keeps_rho_fixed():
    """configs/cifar10_resnet32_tt_peer.yaml: TT-ADMM's public code holds rho at 1e-3 for the whole phase."""
    cfg = load_config(QUICKSTART.parent / "cifar10_resnet32_tt_peer.yaml")
    growing = load_config(QUICKSTART.parent / "cifar10_resnet32_tt.yaml")
    assert (cfg.admm.rho, cfg.admm.rho_growth, cfg.admm.rho_max) == (1e-3, 1.0, 1e-3)
    assert growing.admm.rho_growth > 1  # the project's own schedule, which the peer config differs from
    assert (dataclasses.replace(cfg.admm, rho_growth=growing.admm.rho_growth, rho_max=growing.admm.rho_max)
            == growing.admm)
