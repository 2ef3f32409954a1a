"""The config dataclass and atomic, checksummed checkpoints."""

from __future__ import annotations

import warnings

import pytest
import torch

from pipeline.checkpoint import CheckpointDir, load_checkpoint
from pipeline.config import TrainConfig, config_for, field_docs
from pipeline.errors import CheckpointError, ConfigError
from pipeline.learners import registry


def test_every_field_has_a_docstring():
    docs = field_docs()
    assert set(docs) == set(TrainConfig.__dataclass_fields__)
    assert all(len(d) > 10 for d in docs.values())
    for cls in registry.learner_classes():  # and every learner's own fields
        docs = field_docs(cls.config_class)
        assert set(docs) == set(cls.config_class.__dataclass_fields__)
        assert all(len(d) > 10 for d in docs.values())


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learner: reptile\nlearner_config:\n  inner_steps: 3\n  inner_lr: 0.2\n"
                    "rotations: false\ndomains: [Greek, Latin]\n")
    cfg = TrainConfig.load(path, ["learner.inner_steps=5", "meta_lr=0.01"])
    assert (cfg.learner, cfg.learner_config.inner_steps, cfg.meta_lr, cfg.rotations) == (
        "reptile", 5, 0.01, False)
    assert cfg.learner_config.inner_lr == 0.2  # the file's, merged field by field
    assert cfg.domains == ("Greek", "Latin")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_learner_defaults_yield_to_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("meta_batch: 7\n")
    cfg = config_for("maml", path, ["ways=3"])
    assert (cfg.learner, cfg.meta_batch, cfg.ways) == ("maml", 7, 3)


@pytest.mark.parametrize(
    "overrides, field",
    [(["learner=svm"], "learner"), (["ways=1"], "ways"), (["ways=five"], "ways"),
     (["nonsense=1"], "nonsense"), (["rotations=maybe"], "rotations"), (["novalue"], "novalue")],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig.load(None, overrides)


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"meta": {"w": torch.randn(10, generator=g)}}


def test_checkpoint_roundtrip_and_pruning(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        ckpts.save(step, _state(step), {"learner": "protonet"}, best=step == 20)
    assert ckpts.steps() == [20, 30]
    latest = ckpts.latest()
    assert latest.step == 30 and torch.equal(latest.state["meta"]["w"], _state(30)["meta"]["w"])
    assert ckpts.best().step == 20
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, damage):
    ckpts = CheckpointDir(tmp_path, keep_last=3)
    ckpts.save(1, _state(1), {})
    path = ckpts.save(2, _state(2), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = ckpts.latest()
    assert found.step == 1
    assert any("step-00000002.pt" in str(w.message) and "falling back" in str(w.message) for w in caught)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(tmp_path / "nothing.pt")
