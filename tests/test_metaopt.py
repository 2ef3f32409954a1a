"""MetaOptNet's learners (metaopt-ridge, metaopt-svm): registry and defaults, the batched path
against the per-task reference loop in float64, the learnable logit scale, the SVM's
non-convergence warning, and a CLI train -> evaluate round trip.

The heads themselves (against scipy, finite differences) are tested in tests/test_heads.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import anole

from pipeline.config import TrainConfig, config_for
from pipeline.episodes import Episodes
from pipeline.errors import ConfigError
from pipeline.learners import BN_MODES, make_learner, registry
from pipeline.learners.metaopt import SCALE, MetaOptRidgeConfig, MetaOptSVMConfig
from pipeline.models import conv4
from pipeline.train import MetaOptimizer, initial_params

WAYS, SIZE, HIDDEN = 3, 16, 6
NAMES = ("metaopt-ridge", "metaopt-svm")
CONFIGS = {
    "metaopt-ridge": MetaOptRidgeConfig(lam=0.5),
    # converged to rounding (the polish step makes the active-set solve exact)
    "metaopt-svm": MetaOptSVMConfig(C=0.5, max_iter=3000, tol=1e-12),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def episodes(tasks: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> Episodes:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS)
    return Episodes(
        torch.rand(tasks, WAYS * shots, 1, SIZE, SIZE, generator=g, dtype=torch.float64),
        labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
        torch.rand(tasks, WAYS * queries, 1, SIZE, SIZE, generator=g, dtype=torch.float64),
        labels.repeat_interleave(queries).expand(tasks, -1).contiguous(),
        WAYS, shots, queries,
    )


def learner(name: str, backend: str = "grouped", config=None):
    torch.manual_seed(1)
    model = conv4(1, None, HIDDEN, SIZE).double()
    return make_learner(name, config or CONFIGS[name], model=model, backend=backend)


def params_of(lrn, scale: float = 1.7) -> dict[str, torch.Tensor]:
    params = lrn.init_params()
    assert params[SCALE].tolist() == [1.0] and params[SCALE].dtype == torch.float64
    params[SCALE] = torch.tensor([scale], dtype=torch.float64)  # off 1.0: its role shows
    return params


def test_registry_lists_both_and_their_defaults_are_valid_runs():
    assert set(NAMES) <= set(registry.names())
    for name in NAMES:
        cls = registry.learner_class(name)
        cfg = config_for(name)
        assert isinstance(cfg, TrainConfig) and cfg.learner == name
        assert type(cfg.learner_config) is cls.config_class and not cls.has_head
        template, params = cls.param_template(cfg), initial_params(cfg)
        assert template.keys() == params.keys() and SCALE in params
        assert params[SCALE].tolist() == [1.0] and "head.weight" not in params
    with pytest.raises(ConfigError, match=r"learner\.C"):
        config_for("metaopt-svm", overrides=["learner.C=0"])
    with pytest.raises(ConfigError, match=r"learner\.lam"):
        config_for("metaopt-ridge", overrides=["learner.lam=-1"])
    with pytest.raises(ConfigError, match=r"learner\.max_iter"):
        MetaOptSVMConfig(max_iter=0)
    with pytest.raises(ConfigError, match=r"learner\.dual_ridge"):
        MetaOptSVMConfig(dual_ridge=-0.1)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the SVM converged: no warning
@pytest.mark.parametrize("backend", ["grouped", "vmap"])
@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_reference_in_float64(name: str, backend: str):
    lrn, ep = learner(name, backend), episodes()
    params = params_of(lrn)
    grads, metrics = lrn.meta_gradient(params, ep)
    ref_grads, ref_metrics = lrn.reference_meta_gradient(params, ep)
    assert grads.keys() == ref_grads.keys() == params.keys()
    for k in params:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-8, atol=1e-10, msg=k)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-9, abs=1e-12)
    for bn_mode in BN_MODES:
        logits = lrn.adapt_and_predict(params, ep, bn_mode=bn_mode)
        ref = lrn.reference_adapt_and_predict(params, ep, bn_mode=bn_mode)
        assert logits.shape == (3, WAYS * 2, WAYS)
        torch.testing.assert_close(logits, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_scale_is_learned(name: str):
    """The logit scale has a true (finite-difference) nonzero gradient, and an outer step
    moves it."""
    lrn, ep = learner(name), episodes()
    params = params_of(lrn, 1.0)
    grads, _ = lrn.meta_gradient(params, ep)
    g = grads[SCALE]
    assert g.shape == (1,) and g.abs().item() > 1e-6

    def loss(s: float) -> float:
        return lrn.meta_gradient({**params, SCALE: torch.tensor([s], dtype=torch.float64)},
                                 ep)[1]["loss"]

    h = 1e-5
    assert g.item() == pytest.approx((loss(1 + h) - loss(1 - h)) / (2 * h), rel=1e-5)

    cfg = TrainConfig(learner=name, hidden=HIDDEN, image_size=SIZE, ways=WAYS)
    meta = MetaOptimizer(initial_params(cfg), cfg, total_steps=1)
    before = meta.params[SCALE].clone()
    meta.apply({k: grads[k].float() if k in grads else torch.zeros_like(v)
                for k, v in meta.params.items()}, ep.num_tasks, 0)
    assert not torch.equal(meta.params[SCALE], before)


def test_svm_non_convergence_warns_with_the_residual():
    lrn = learner("metaopt-svm", config=MetaOptSVMConfig(C=0.5, max_iter=1, tol=1e-12))
    with pytest.warns(RuntimeWarning, match=r"max_iter=1.*relative duality gap \(residual\)"):
        lrn.adapt_and_predict(params_of(lrn), episodes())


@pytest.mark.parametrize("name", NAMES)
def test_train_then_evaluate_checkpoint(name, tmp_path, omniglot_store, tiny):
    run = tmp_path / "run"
    sets = [x for o in tiny for x in ("--set", o)]
    trained = json.loads(anole("train", "--learner", name, "--steps", "2", "--out", str(run),
                               "--store", str(omniglot_store.root), "--json", *sets).stdout)
    assert trained["step"] == 2
    scored = json.loads(anole("evaluate", "--checkpoint", trained["best_checkpoint"],
                              "--ways", "5", "--episodes", "4",
                              "--store", str(omniglot_store.root), "--json").stdout)
    assert scored["heldout"]["ways"] == 5 and scored["heldout"]["episodes"] == 4
    assert 0 <= scored["heldout"]["mean"] <= 1


# --- on a local Ray: the distributed trainer equals the single-process one ------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_ray_training_matches_the_single_process_trainer(name, tmp_path):
    """2 Ray workers, each summing its shard of the meta-batch, end where the Trainer does
    (the learner-owned logit scale travels with the conv4's parameters)."""
    ray = pytest.importorskip("ray")
    from faults import flat_params
    from test_workers import EXACT, ONE_CPU, ZIP

    from pipeline.store import Store
    from pipeline.train import Trainer
    from workers.driver import train_distributed

    if not ZIP.exists():
        pytest.skip(f"{ZIP} not found; set ANOLE_DATA")
    Store(tmp_path / "store").ingest(ZIP)
    images = Store(tmp_path / "store").load_images()
    cfg = TrainConfig(learner=name, **{**EXACT, "steps": 2, "val_every": 2,
                                       "checkpoint_every": 2})
    expected = Trainer(cfg, images, tmp_path / "single", log_tensorboard=False).run()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        result = train_distributed(cfg, images, tmp_path / "ray", workers=2, options=ONE_CPU,
                                   log_tensorboard=False)
    finally:
        ray.shutdown()
    want = flat_params(expected.latest_checkpoint)
    # float32 shard sums in another order, through Adam's first steps (see test_workers)
    gap = float(((result.final_params - want) ** 2).sum() ** 0.5 / (want**2).sum() ** 0.5)
    assert gap < 5e-4, f"{name}: relative difference {gap:.1e}"
    assert result.counters["applied"] == cfg.steps and result.counters["duplicates"] == 0
    manifest = json.loads(result.latest_checkpoint.with_suffix(".json").read_text())
    assert manifest["learner"] == name
