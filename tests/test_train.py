"""The single-process trainer on real Omniglot: learning, checkpoints, bit-identical resume."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import config_for
from pipeline.scoring import load_model, score_heldout, score_oneshot
from pipeline.train import Trainer


def _images(store, cfg):
    return store.load_images(None, image_size=cfg.image_size, channels=cfg.channels, invert=cfg.invert)


@pytest.mark.parametrize(
    "learner, extra",
    [
        ("protonet", []),
        ("fomaml", ["learner.inner_lr=0.4", "meta_lr=0.01"]),
        ("maml", ["learner.inner_lr=0.4", "meta_lr=0.01"]),
        ("reptile", ["learner.inner_steps=3"]),
    ],
)
def test_loss_falls_on_real_omniglot(omniglot_store, tmp_path, learner, extra):
    torch.set_num_threads(2)
    cfg = config_for(learner, overrides=["hidden=16", "meta_batch=8", "ways=5", "queries=3",
                                         "augment_rotate_deg=0", "augment_translate=0",
                                         "augment_scale=0", "val_episodes=4",
                                         "val_ways=5", "val_every=1000", "lr_schedule=constant", "meta_lr=0.003",
                                         "rotations=false", *extra], steps=40)
    trainer = Trainer(cfg, _images(omniglot_store, cfg), tmp_path, log_tensorboard=False)
    result = trainer.run()
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) >= 3
    first, last = losses[0], sum(losses[-2:]) / 2
    assert last < first * 0.9, f"{learner}: loss {first:.3f} -> {last:.3f}"


def test_resume_is_bit_identical(omniglot_store, tmp_path, tiny):
    cfg = config_for("fomaml", overrides=[*tiny, "augment_rotate_deg=10"], steps=6)
    images = _images(omniglot_store, cfg)
    straight = Trainer(cfg, images, tmp_path / "a", log_tensorboard=False).run()

    # The same run, crashing in step 4 (after the step-3 checkpoint), resumed by a new Trainer.
    def crash(step: int, total: int, metrics: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, images, tmp_path / "b", progress=crash, log_tensorboard=False).run()
    resumed = Trainer(cfg, images, tmp_path / "b", log_tensorboard=False).run(resume=True)
    assert resumed.step == straight.step == 6

    a = load_model(straight.latest_checkpoint).params
    b = load_model(resumed.latest_checkpoint).params
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = json.loads(straight.latest_checkpoint.with_suffix(".json").read_text())
    mb = json.loads(resumed.latest_checkpoint.with_suffix(".json").read_text())
    assert ma["data_version"] == mb["data_version"] and ma["split"] == mb["split"]


def test_resume_refuses_a_different_config(omniglot_store, tmp_path, tiny):
    from pipeline.errors import ConfigError

    cfg = config_for("protonet", overrides=tiny, steps=3)
    images = _images(omniglot_store, cfg)
    Trainer(cfg, images, tmp_path, log_tensorboard=False).run()
    with pytest.raises(ConfigError, match="hidden"):
        Trainer(cfg.replace(hidden=16), images, tmp_path, log_tensorboard=False).run(resume=True)


def test_best_checkpoint_and_scoring(omniglot_store, tmp_path, oneshot_runs, tiny):
    cfg = config_for("protonet", overrides=tiny, steps=6)
    result = Trainer(cfg, _images(omniglot_store, cfg), tmp_path, log_tensorboard=True).run()
    assert result.best_checkpoint.name.startswith("best-")
    assert load_model(tmp_path / "checkpoints" / "best.pt").path == result.best_checkpoint
    assert (tmp_path / "tensorboard").is_dir()
    assert (tmp_path / "metrics.jsonl").exists()
    model = load_model(tmp_path)
    assert model.config == cfg
    assert not set(model.split.test) & set(model.split.train)
    scores = score_oneshot(model, oneshot_runs[:1])
    assert 0.0 <= scores.mean_error <= 1.0
    acc = score_heldout(model, omniglot_store, ways=5, shots=1, episodes=10)
    assert acc.episodes == 10 and acc.bn_mode == "transductive"
    assert 0.2 <= acc.mean <= 1.0


def test_test_time_augmentation_averages_seeded_views(omniglot_store, tmp_path, tiny):
    from pipeline.errors import ConfigError
    from pipeline.tasks import materialize
    from pipeline.train import augment_ranges, eval_specs, predict_views

    cfg = config_for("protonet", overrides=[*tiny, "augment_rotate_deg=10", "augment_shear=0.2"],
                     steps=3)
    images = _images(omniglot_store, cfg)
    Trainer(cfg, images, tmp_path, log_tensorboard=False).run()
    model = load_model(tmp_path)
    learner, params = model.learner, model.params
    specs = eval_specs(images, model.split.val, ways=5, shots=1, queries=2, episodes=3, seed=0,
                       mode="within")
    ep = materialize(images, specs)
    one = predict_views(learner, params, ep, bn_mode="transductive")
    plain = learner.adapt_and_predict(params, ep, bn_mode="transductive")
    torch.testing.assert_close(one, torch.log_softmax(plain, -1))
    views = dict(bn_mode="transductive", views=4, augment=augment_ranges(cfg))
    a = predict_views(learner, params, ep, seed=1, **views)
    assert torch.equal(a, predict_views(learner, params, ep, seed=1, **views))
    assert not torch.equal(a, predict_views(learner, params, ep, seed=2, **views))
    assert not torch.allclose(a, one)
    with pytest.raises(ConfigError, match="eval_views"):
        predict_views(learner, params, ep, bn_mode="transductive", views=2, augment={})
    # scoring takes the number of views from the checkpoint's config
    model.config = model.config.replace(eval_views=3)
    acc = score_heldout(model, omniglot_store, ways=5, shots=1, episodes=6)
    assert acc.episodes == 6 and 0.0 <= acc.mean <= 1.0


def test_time_budget_sets_the_step_count(omniglot_store, tmp_path, tiny):
    cfg = config_for("protonet", overrides=[*tiny, "val_every=1000"], minutes=0.15)
    result = Trainer(cfg, _images(omniglot_store, cfg), tmp_path, log_tensorboard=False).run()
    # The budget, not the default 1000 steps, set the schedule's length and ended the run.
    assert result.total_steps < cfg.steps
    assert 1 <= result.step <= result.total_steps
    manifest = json.loads(result.latest_checkpoint.with_suffix(".json").read_text())
    assert manifest["total_steps"] == result.total_steps


def test_reptile_outer_update_is_annealed_or_adam():
    from pipeline.config import TrainConfig
    from pipeline.train import MetaOptimizer, initial_params

    cfg = TrainConfig(learner="reptile", hidden=8,
                      learner_config={"meta_step_start": 0.8, "meta_step_end": 0.0})
    anneal = MetaOptimizer(initial_params(cfg), cfg, total_steps=10)
    assert isinstance(anneal.optimizer, torch.optim.SGD)
    assert anneal.learning_rate(0) == pytest.approx(0.8) and anneal.learning_rate(5) == pytest.approx(0.4)
    # a plain SGD step of size epsilon on mean(phi - theta) moves phi to phi + eps * (theta - phi)
    before = {k: v.clone() for k, v in anneal.params.items()}
    anneal.apply({k: 2 * torch.ones_like(v) for k, v in before.items()}, num_tasks=2, step=0)
    assert all(torch.allclose(anneal.params[k], before[k] - 0.8) for k in before)

    adam_cfg = cfg.with_learner(reptile_outer="adam").replace(meta_lr=0.01, lr_schedule="constant")
    adam = MetaOptimizer(initial_params(adam_cfg), adam_cfg, total_steps=10)
    assert isinstance(adam.optimizer, torch.optim.Adam)
    assert adam.learning_rate(5) == pytest.approx(0.01)
