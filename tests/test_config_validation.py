"""Every config field's allowed values: declared once, enforced at construction, documented."""

from __future__ import annotations

import dataclasses
import math

import pytest

from pipeline.config import (
    OneOf,
    Range,
    TrainConfig,
    check_values,
    config_for,
    field_docs,
    field_ranges,
)
from pipeline.errors import ConfigError
from pipeline.learners import registry

LEARNERS = registry.names()

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# (override, what the one-line message must say: field, value as given, range)
BAD = [
    ("meta_lr=nan", "'meta_lr' = nan: must be a finite number > 0"),
    ("meta_lr=-1", "'meta_lr' = -1: must be a finite number > 0"),
    ("meta_lr=0", "'meta_lr' = 0: must be a finite number > 0"),
    ("learner.inner_lr=inf", "'learner.inner_lr' = inf: must be a finite number > 0"),
    ("learner.inner_lr=-inf", "'learner.inner_lr' = -inf: must be a finite number > 0"),
    ("learner.temperature=0", "'learner.temperature' = 0: must be a finite number > 0"),
    ("hidden=0", "'hidden' = 0: must be an integer >= 1"),
    ("hidden=2.5", "'hidden' = '2.5': must be an integer >= 1"),  # not silently 2
    ("val_episodes=0", "'val_episodes' = 0: must be an integer >= 1"),
    ("val_ways=1", "'val_ways' = 1: must be an integer >= 2"),
    ("learner.inner_steps=-1", "'learner.inner_steps' = -1: must be an integer >= 0"),
    ("keep_last=0", "'keep_last' = 0: must be an integer >= 1"),
    ("image_size=8", "'image_size' = 8: must be an integer >= 16"),  # conv4 pools it to nothing
    ("seed=-1", "'seed' = -1: must be an integer >= 0 and <= 4294967295"),
    ("split_seed=4294967296", "'split_seed' = 4294967296: must be an integer >= 0"),
    ("augment_translate=1", "'augment_translate' = 1: must be a finite number >= 0 and < 1"),
    ("augment_scale=1.5", "'augment_scale' = 1.5: must be a finite number >= 0 and < 1"),
    ("augment_rotate_deg=-5", "'augment_rotate_deg' = -5: must be a finite number >= 0 and <= 180"),
    ("learner.meta_step_start=0", "'learner.meta_step_start' = 0: must be a finite number > 0 and <= 1"),
    ("learner.meta_step_end=nan", "'learner.meta_step_end' = nan: must be a finite number >= 0 and <= 1"),
    ("minutes=-1", "'minutes' = -1: must be a finite number >= 0"),
    ("minutes=inf", "'minutes' = inf: must be a finite number >= 0"),
    ("num_threads=-1", "'num_threads' = -1: must be an integer >= 0"),
    ("channels=2", "'channels' = 2: must be 1 or 3"),
    ("learner=svm", "'learner' = 'svm': must be protonet, reptile, maml, fomaml, metaopt-ridge or metaopt-svm"),
    ("bn_mode=batch", "'bn_mode' = 'batch': must be transductive, per_image or support"),
    ("rotations=maybe", "'rotations' = 'maybe': must be true or false"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_out_of_range_override_is_refused(override, message):
    learner = _learner_with(override)
    with pytest.raises(ConfigError) as info:
        TrainConfig.load(None, [f"learner={learner}", override] if learner else [override])
    text = str(info.value)
    assert message in text and "\n" not in text


def _learner_with(override: str) -> str | None:
    """The first registered learner whose config has the field of a learner.FIELD override."""
    key = override.partition("=")[0]
    if not key.startswith("learner."):
        return None
    field = key.removeprefix("learner.")
    return next(c.name for c in registry.learner_classes()
                if field in c.config_class.__dataclass_fields__)


# Values at the edge of a range that runs legitimately use.
EDGES = [
    "learner.inner_steps=0", "learner.eval_inner_steps=0", "learner.refine_steps=0",
    "learner.meta_step_end=0", "minutes=0",
    "num_threads=0", "val_domains=0", "test_domains=0", "augment_rotate_deg=180",
    "augment_translate=0.99", "augment_shear=1", "seed=4294967295", "image_size=16",
    "learner.meta_step_start=1", "learner.inner_lr=1e-9", "channels=3", "ways=2", "val_ways=2",
]


def test_edge_values_are_accepted():
    for override in EDGES:
        learner = _learner_with(override)
        TrainConfig.load(None, [f"learner={learner}", override] if learner else [override])


def _outside(rule: Range) -> list[float]:
    """Values just outside each bound of `rule`, plus nan and both infinities."""
    out = [math.nan, math.inf, -math.inf]
    out += [b for b in (rule.gt, rule.lt) if b is not None]
    out += [b - 1 for b in (rule.ge,) if b is not None] + [b + 1 for b in (rule.le,) if b is not None]
    return out


def test_every_numeric_field_refuses_values_outside_its_range():
    # the run's fields, then every learner's own (declared with the same knob rules)
    classes = [(TrainConfig, "")] + [(c.config_class, "learner.") for c in registry.learner_classes()]
    total = 0
    for cls, prefix in classes:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        defaults = cls()
        hints = {f: type(getattr(defaults, f)) for f in fields}
        numeric = [name for name, f in fields.items() if isinstance(f.metadata["rule"], Range)]
        total += len(numeric)
        for name in numeric:
            for value in _outside(fields[name].metadata["rule"]):
                if hints[name] is int and not math.isfinite(value):
                    continue  # an int field cannot hold nan; _coerce refuses the text instead
                value = int(value) if hints[name] is int else float(value)
                with pytest.raises(ConfigError, match=f"'{prefix}{name}'"):
                    cls(**{name: value})
    assert total >= 40  # every int and float knob has a declared range


def test_float_fields_refuse_nan_and_inf_from_yaml(tmp_path):
    floats = [name for name in FIELDS if isinstance(getattr(TrainConfig(), name), float)]
    assert "meta_lr" in floats and "augment_shear" in floats
    for name in floats:
        for text in (".nan", ".inf", "-.inf"):
            path = tmp_path / "c.yaml"
            path.write_text(f"{name}: {text}\n")
            with pytest.raises(ConfigError, match=f"{path}: config field '{name}'"):
                TrainConfig.load(path)


def test_int_field_from_yaml_infinity_is_an_error_not_an_overflow(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hidden: .inf\n")
    with pytest.raises(ConfigError, match="'hidden' = inf: must be an integer >= 1"):
        TrainConfig.load(path)


def test_checkpoint_config_is_checked_and_names_its_source():
    data = {**TrainConfig().to_dict(), "val_episodes": 0}
    with pytest.raises(ConfigError, match=r"^run/best\.json: config field 'val_episodes' = 0"):
        TrainConfig.from_dict(data, source="run/best.json")


def test_replace_is_checked():
    with pytest.raises(ConfigError, match="'eval_views' = 0"):
        TrainConfig().replace(eval_views=0)


def test_learner_defaults_and_test_configs_are_in_range(tiny):
    for learner in LEARNERS:
        assert config_for(learner).learner == learner
        assert config_for(learner, overrides=tiny, steps=6).hidden == 8
        assert set(registry.learner_class(learner).defaults) <= set(FIELDS)


def test_every_field_documents_its_range():
    docs, ranges = field_docs(), field_ranges()
    assert set(ranges) == set(FIELDS)
    for name, doc in docs.items():
        assert doc.rstrip().endswith(f"range: {ranges[name]}")
    assert ranges["meta_lr"] == "a finite number > 0"
    assert ranges["augment_translate"] == "a finite number >= 0 and < 1"
    assert ranges["sampling"] == "within or unstructured"


def test_check_values_names_flag_value_and_range_and_skips_unset():
    check_values([("--ways", None, Range(ge=2)), ("--mode", "within", OneOf(("within",)))])
    with pytest.raises(ConfigError, match=r"^--minutes -0\.5: must be a finite number > 0$"):
        check_values([("--ways", 5, Range(ge=2)), ("--minutes", -0.5, Range(gt=0))])
    with pytest.raises(ConfigError, match=r"^--episodes 0: must be an integer >= 1$"):
        check_values([("--episodes", 0, Range(ge=1))])
    # True is 1 to Python, but never a count or a channel number
    with pytest.raises(ConfigError, match="'channels' = True"):
        TrainConfig(channels=True)
