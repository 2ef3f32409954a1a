"""The one training config: every knob of a run, saved into every checkpoint.

Load it from YAML and `key=value` overrides:

    cfg = TrainConfig.load("reptile.yaml", ["learner.inner_steps=5", "meta_batch=16"])

The chosen learner's own settings are a nested config (`TrainConfig.learner_config`, that
learner's `config_class`, declared with the same `knob(default, rule)` fields in the
learner's file): `learner.inner_lr=0.1` on the command line, a `learner_config:` mapping (or
`learner: {name: reptile, inner_lr: 0.1}`) in YAML, nested JSON in every checkpoint. The
learner names, their config classes and their tuned defaults come from the registry
(`pipeline.learners.registry`); nothing here names a learner.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import operator
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import ConfigError

DEFAULT_LEARNER = "protonet"
SAMPLINGS = ("within", "unstructured")


# --- value rules ------------------------------------------------------------------------------
# Every field declares the values it accepts once, with `knob(default, rule)`. The check at
# construction, its error message and the "range:" line of `anole train --help-config` are all
# derived from that rule, so the documentation cannot drift from the check.


class Rule(Protocol):
    def accepts(self, value: Any, kind: type) -> bool:
        """Whether `value` is allowed for a field annotated `kind`."""
        ...

    def describe(self, kind: type) -> str:
        """The allowed values, completing "must be ..."."""
        ...


_BOUNDS: tuple[tuple[str, str, Callable[[Any, Any], bool]], ...] = (
    ("gt", ">", operator.gt), ("ge", ">=", operator.ge),
    ("lt", "<", operator.lt), ("le", "<=", operator.le),
)


@dataclass(frozen=True)
class Range:
    """Numbers within the given bounds (None: unbounded on that side); never nan or inf."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def _bounds(self) -> list[tuple[str, Callable[[Any, Any], bool], float]]:
        return [(sym, op, b) for name, sym, op in _BOUNDS if (b := getattr(self, name)) is not None]

    def accepts(self, value: Any, kind: type) -> bool:
        # bool is an int subclass but never a count; an int field takes only ints.
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return all(op(value, bound) for _, op, bound in self._bounds())

    def describe(self, kind: type) -> str:
        noun = "an integer" if kind is int else "a finite number"
        return f"{noun} " + " and ".join(f"{sym} {shown(b)}" for sym, _, b in self._bounds())


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values."""

    choices: tuple[Any, ...]

    def accepts(self, value: Any, kind: type) -> bool:
        # compare types too: True == 1, but True is not a channel count
        return any(type(value) is type(c) and value == c for c in self.choices)

    def describe(self, kind: type) -> str:
        *rest, last = [str(c) for c in self.choices]
        return f"{', '.join(rest)} or {last}" if rest else last


@dataclass(frozen=True)
class _Flag:
    def accepts(self, value: Any, kind: type) -> bool:
        return isinstance(value, bool)

    def describe(self, kind: type) -> str:
        return "true or false"


@dataclass(frozen=True)
class _Names:
    def accepts(self, value: Any, kind: type) -> bool:
        return isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)

    def describe(self, kind: type) -> str:
        return "a list of domain names (comma-separated in --set)"


FLAG, NAMES = _Flag(), _Names()
SEED = Range(ge=0, le=2**32 - 1)  # numpy's SeedSequence needs >= 0; the task sampler's seeds are 32-bit


def knob(default: Any, rule: Rule) -> Any:
    """A config field: its default and the rule every value of it must follow."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def shown(value: Any) -> str:
    """A value as a user typed it: -1 rather than -1.0, quotes around strings."""
    text = repr(value)
    return text.removesuffix(".0") if isinstance(value, float) else text


def check_values(checks: Iterable[tuple[str, Any, Rule]]) -> None:
    """Raise ConfigError for the first (label, value, rule) whose value the rule refuses.

    For arguments outside a config (command-line flags): the message names the label, the
    value given and the allowed range, e.g. "--episodes 0: must be an integer >= 1". A None
    value (an optional argument not given) is skipped.
    """
    for label, value, rule in checks:
        if value is None:
            continue
        kind = int if isinstance(value, int) and not isinstance(value, bool) else float
        if not rule.accepts(value, kind):
            raise ConfigError(f"{label} {shown(value)}: must be {rule.describe(kind)}")


def _registry():  # the learner registry, imported late (it imports torch and the learners)
    from .learners import registry

    return registry


@dataclass(frozen=True)
class _LearnerName:
    def accepts(self, value: Any, kind: type) -> bool:
        return isinstance(value, str) and value in _registry().names()

    def describe(self, kind: type) -> str:
        return OneOf(_registry().names()).describe(kind)


@dataclass(frozen=True)
class _LearnerSettings:
    """The nested learner config: checked by its own fields' rules (see TrainConfig)."""

    def accepts(self, value: Any, kind: type) -> bool:
        return True

    def describe(self, kind: type) -> str:
        return "the chosen learner's fields (learner.FIELD=VALUE)"


@dataclass(frozen=True)
class UnitPair:
    """Two numbers in [0, 1): Adam's (beta1, beta2)."""

    def accepts(self, value: Any, kind: type) -> bool:
        return (isinstance(value, tuple) and len(value) == 2
                and all(Range(ge=0, lt=1).accepts(v, float) for v in value))

    def describe(self, kind: type) -> str:
        return "two finite numbers >= 0 and < 1 (comma-separated in --set)"


def check_knobs(config: Any, prefix: str = "") -> None:
    """Raise a one-line ConfigError for the first field of `config` its rule refuses."""
    kinds = _kinds(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        rule: Rule = f.metadata["rule"]
        if not rule.accepts(value, kinds[f.name]):
            raise ConfigError(
                f"config field '{prefix}{f.name}' = {shown(value)}: must be "
                f"{rule.describe(kinds[f.name])} (`anole train --help-config` lists every range)"
            )


@dataclass(frozen=True)
class LearnerConfig:
    """Base of every learner's own config: frozen, every field a `knob(default, rule)` with a
    docstring, checked at construction; addressed as `learner.FIELD` in a run config."""

    def __post_init__(self) -> None:
        check_knobs(self, "learner.")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config",
                  learner: str = "this learner") -> LearnerConfig:
        """Build from a dict, converting values; a key the class lacks is a one-line error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"{source}: learner {learner!r} has no config field "
                f"{', '.join(repr(f'learner.{k}') for k in unknown)}; its fields: "
                f"{', '.join(fields) or 'none'}"
            )
        hints = _kinds(cls)
        values = {k: _coerce(v, hints[k], f"learner.{k}", source, fields[k].metadata["rule"])
                  for k, v in data.items()}
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class TrainConfig:
    """A meta-training run: data, episodes, learner, optimisation, evaluation and bookkeeping."""

    # --- learner -------------------------------------------------------------
    learner: str = knob(DEFAULT_LEARNER, _LearnerName())
    """Meta-learner, by its registered name (`anole train --help-config` lists them)."""
    learner_config: Any = knob(None, _LearnerSettings())
    """The chosen learner's own settings (its `config_class`; None: that class's defaults).
    Set them as learner.FIELD=VALUE; each learner's fields are listed below."""
    eval_views: int = knob(1, Range(ge=1))
    """Test-time augmentation when a checkpoint is scored (`anole evaluate`, the flows):
    log-probabilities averaged over this many views of each episode (the episode itself, plus
    random affine copies of its support and query images within the augment_* limits). 1
    disables. Validation during training, which only ranks checkpoints, uses one view."""
    bn_mode: str = knob("transductive", OneOf(("transductive", "per_image", "support")))
    """BatchNorm statistics at evaluation: transductive (whole query set), per_image, or support."""

    # --- episodes ------------------------------------------------------------
    ways: int = knob(5, Range(ge=2))
    """Classes per training episode (N in N-way)."""
    shots: int = knob(1, Range(ge=1))
    """Support images per class in training episodes (K in K-shot)."""
    queries: int = knob(5, Range(ge=1))
    """Query images per class in training episodes."""
    meta_batch: int = knob(32, Range(ge=1))
    """Episodes (tasks) per meta-update."""
    sampling: str = knob("unstructured", OneOf(SAMPLINGS))
    """How a training episode picks classes: within (one domain) or unstructured (any domain)."""
    rotations: bool = knob(True, FLAG)
    """Add 90/180/270-degree rotated copies of every class as new classes."""
    augment_rotate_deg: float = knob(0.0, Range(ge=0, le=180))
    """Max random rotation (degrees) of each support/query image; 0 disables."""
    augment_translate: float = knob(0.0, Range(ge=0, lt=1))
    """Max random translation as a fraction of the image side; 0 disables."""
    augment_scale: float = knob(0.0, Range(ge=0, lt=1))
    """Max random relative zoom (0.1 = 0.9x to 1.1x); 0 disables."""
    augment_shear: float = knob(0.0, Range(ge=0, le=1))
    """Max random horizontal shear, a slant (0.3: x moves by up to 0.3 y); 0 disables."""

    # --- data ----------------------------------------------------------------
    image_size: int = knob(28, Range(ge=16))
    """Side of the square images fed to the network."""
    channels: int = knob(1, OneOf((1, 3)))
    """Image channels: 1 for Omniglot, 3 for RGB domains."""
    invert: bool = knob(True, FLAG)
    """Invert intensities so strokes are 1 (Omniglot convention)."""
    domains: tuple[str, ...] = knob((), NAMES)
    """Domains to use from the store; empty means all current domains."""
    val_domains: int = knob(1, Range(ge=0))
    """How many domains to hold out for validation (never trained on)."""
    test_domains: int = knob(1, Range(ge=0))
    """How many domains to hold out for testing (never trained on nor validated on)."""
    split_seed: int = knob(0, SEED)
    """Seed of the domain-level train/val/test split."""

    # --- model ---------------------------------------------------------------
    hidden: int = knob(64, Range(ge=1))
    """Channels of each conv4 block."""

    # --- optimisation --------------------------------------------------------
    meta_optimizer: str = knob("adam", OneOf(("adam", "sgd")))
    """Outer (meta) optimiser: adam or sgd (a learner may set its own, e.g. Reptile's
    learner.reptile_outer)."""
    meta_lr: float = knob(1e-3, Range(gt=0))
    """Outer (meta) learning rate for adam/sgd."""
    lr_schedule: str = knob("cosine", OneOf(("constant", "cosine")))
    """Outer learning-rate schedule for adam/sgd: constant or cosine."""
    steps: int = knob(1000, Range(ge=1))
    """Meta-updates in the run (a time budget, when given, replaces it)."""
    minutes: float = knob(0.0, Range(ge=0))
    """Time budget in minutes; > 0 sets `steps` from the throughput measured at the start."""
    budget_clock: str = knob("wall", OneOf(("wall", "cpu")))
    """Clock of the time budget: wall (elapsed time) or cpu (this process's CPU time divided by
    its torch threads: a fair budget on a machine shared with other work)."""
    seed: int = knob(0, SEED)
    """Seed for episodes, augmentation and initialisation: same seed, same run."""
    num_threads: int = knob(0, Range(ge=0))
    """torch CPU threads; 0 lets torch decide."""
    device: str = knob("auto", OneOf(("auto", "cpu", "cuda")))
    """Where training and evaluation run: cpu, cuda, or auto (cuda when available, else cpu).
    The fused C++ kernels serve CPU tensors only."""
    precision: str = knob("auto", OneOf(("auto", "float32", "bfloat16")))
    """Convolution arithmetic: float32, bfloat16 (mixed precision: bfloat16 convolutions and
    activations, float32 parameters, statistics and loss), or auto (bfloat16 where the device
    has native bfloat16 matrix units: CPUs with AMX or AVX512-BF16, CUDA GPUs from Ampere on)."""

    # --- evaluation and bookkeeping -------------------------------------------
    val_every: int = knob(100, Range(ge=1))
    """Meta-updates between validation runs (and best-checkpoint checks)."""
    val_episodes: int = knob(200, Range(ge=1))
    """Episodes per validation run."""
    val_ways: int = knob(20, Range(ge=2))
    """Ways of validation episodes (20 matches Lake's one-shot protocol)."""
    val_shots: int = knob(1, Range(ge=1))
    """Shots of validation episodes."""
    val_sampling: str = knob("within", OneOf(SAMPLINGS))
    """Class sampling of validation and test episodes: within or unstructured."""
    checkpoint_every: int = knob(100, Range(ge=1))
    """Meta-updates between checkpoints."""
    keep_last: int = knob(3, Range(ge=1))
    """How many recent checkpoints to keep (the best one is kept as well)."""

    def __post_init__(self) -> None:
        check_knobs(self)
        cls = _registry().learner_class(self.learner).config_class
        settings = self.learner_config
        if settings is None:
            settings = cls()
        elif isinstance(settings, dict):
            settings = cls.from_dict(settings, learner=self.learner)
        elif type(settings) is not cls:
            raise ConfigError(
                f"config field 'learner_config' is a {type(settings).__name__}; learner "
                f"{self.learner!r} takes a {cls.__name__}"
            )
        object.__setattr__(self, "learner_config", settings)

    # --- (de)serialisation -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (the learner's config as a nested dict)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["domains"] = list(self.domains)
        out["learner_config"] = self.learner_config.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a dict, converting values to each field's type; unknown keys are an error.

        The learner's fields come nested (`learner_config: {...}`, or `learner: {name: ...,
        ...}`) or dotted (`learner.inner_lr`)."""
        data = _nest(data, source)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            learner_fields = _registry().all_learner_fields()
            hint = "".join(
                f"; {k!r} is a learner field now: set it as learner.{k}"
                for k in unknown[:1] if k in learner_fields
            )
            raise ConfigError(
                f"{source}: unknown config field(s) {unknown}{hint}; run `anole train "
                "--help-config` for the list"
            )
        hints = _kinds(cls)
        values = {
            k: _coerce(v, hints[k], k, source, fields[k].metadata["rule"])
            for k, v in data.items() if k != "learner_config"
        }
        learner = values.get("learner", DEFAULT_LEARNER)
        try:
            check_knobs_of("learner", learner)
            nested = data.get("learner_config")
            if isinstance(nested, dict):
                values["learner_config"] = _registry().learner_class(learner).config_class.from_dict(
                    nested, source=source, learner=learner)
            elif nested is not None:
                values["learner_config"] = nested
            return cls(**values)
        except ConfigError as exc:
            text = str(exc)
            raise ConfigError(text if text.startswith(f"{source}:") else f"{source}: {text}") from None

    @classmethod
    def from_saved(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """`from_dict` for a config saved by any anole (a checkpoint manifest, config.json): a
        flat config of the layout before nested learner configs is migrated first."""
        return cls.from_dict(migrate_config(data), source=source)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
             *, base: dict[str, Any] | None = None, **fields: Any) -> TrainConfig:
        """Defaults, then `base`, then the YAML file at `path`, then `key=value` overrides, then
        `fields`. Learner fields merge key by key across these layers (a layer that changes the
        learner drops the learner fields set before it)."""
        data: dict[str, Any] = {}
        _merge(data, base or {}, "config")
        source = str(path) if path else "overrides"
        if path is not None:
            import yaml

            path = Path(path)
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a mapping of field: value")
            _merge(data, loaded, source)
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(
                    f"override {item!r} must look like key=value, e.g. learner.inner_steps=5")
            _merge(data, {key.strip(): value.strip()}, source)
        _merge(data, {k: v for k, v in fields.items() if v is not None}, source)
        return cls.from_dict(data, source=source)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again). Changing the learner without
        giving its `learner_config` starts from the new learner's defaults."""
        if "learner" in changes and changes["learner"] != self.learner:
            changes.setdefault("learner_config", None)
        return dataclasses.replace(self, **changes)

    def with_learner(self, **changes: Any) -> TrainConfig:
        """A copy with some of the learner's own fields changed (validated again; a field the
        learner lacks is a one-line ConfigError)."""
        settings = type(self.learner_config).from_dict(
            {**self.learner_config.to_dict(), **changes}, learner=self.learner)
        return dataclasses.replace(self, learner_config=settings)


def check_knobs_of(name: str, value: Any) -> None:
    """Check one TrainConfig field's value alone (one-line ConfigError)."""
    f = TrainConfig.__dataclass_fields__[name]
    kind = _kinds(TrainConfig)[name]
    if not f.metadata["rule"].accepts(value, kind):
        raise ConfigError(f"config field '{name}' = {shown(value)}: must be "
                          f"{f.metadata['rule'].describe(kind)}")


def _nest(data: dict[str, Any], source: str) -> dict[str, Any]:
    """`data` with the learner's fields gathered under "learner_config" (a dict), from a
    `learner: {name: ..., ...}` mapping and from dotted `learner.X` / `learner_config.X` keys."""
    out = dict(data)
    nested: dict[str, Any] = {}
    if isinstance(out.get("learner"), dict):
        mapping = dict(out.pop("learner"))
        if "name" in mapping:
            out["learner"] = mapping.pop("name")
        nested.update(mapping)
    given = out.pop("learner_config", None)
    if isinstance(given, LearnerConfig):
        given = given.to_dict() if nested or any("." in k for k in out) else given
    if isinstance(given, LearnerConfig):
        out["learner_config"] = given
        return out
    if given is not None:
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: config field 'learner_config' must be a mapping of "
                              "the learner's fields")
        nested = {**given, **nested}
    for key in [k for k in out if isinstance(k, str) and "." in k]:
        head, _, field = key.partition(".")
        if head not in ("learner", "learner_config"):
            raise ConfigError(f"{source}: unknown config field {key!r}; nested fields are "
                              "learner.FIELD (`anole train --help-config` lists them)")
        nested[field] = out.pop(key)
    if nested or given is not None:
        out["learner_config"] = nested
    return out


def _merge(data: dict[str, Any], layer: dict[str, Any], source: str) -> None:
    """Merge one config layer into `data` (learner fields key by key)."""
    layer = _nest(layer, source)
    if "learner" in layer and layer["learner"] != data.get("learner", layer["learner"]):
        data.pop("learner_config", None)  # fields of the previous learner do not carry over
    nested = layer.pop("learner_config", None)
    data.update(layer)
    if nested is not None:
        if isinstance(nested, LearnerConfig):
            nested = nested.to_dict()
        data["learner_config"] = {**data.get("learner_config", {}), **nested}


def migrate_config(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config in today's nested layout: a flat config (every learner's fields at the
    top level, as anole wrote them before nested learner configs) gets its learner's fields
    moved under "learner_config" (each learner's config picks its own fields; the other
    learners' fields are dropped). A nested config comes back unchanged."""
    if "learner_config" in data or isinstance(data.get("learner"), dict):
        return dict(data)
    learner_fields = _registry().all_learner_fields()
    flat = {k: v for k, v in data.items() if k in learner_fields}
    if not flat:
        return dict(data)
    out = {k: v for k, v in data.items() if k not in learner_fields}
    name = out.get("learner", DEFAULT_LEARNER)
    if name in _registry().names():
        mine = {f.name for f in dataclasses.fields(_registry().learner_class(name).config_class)}
        out["learner_config"] = {k: v for k, v in flat.items() if k in mine}
    return out


@functools.cache
def _kinds(cls: type | None = None) -> dict[str, Any]:
    """Each field's annotated type (resolved once: the annotations are strings)."""
    return typing.get_type_hints(cls or TrainConfig)


def rule_of(name: str) -> Rule:
    """The rule of config field `name` (`learner.FIELD`: of the first registered learner with
    that field): for arguments that mean the same as that field."""
    if name.startswith("learner."):
        field = name.removeprefix("learner.")
        for cls in _registry().learner_classes():
            fields = cls.config_class.__dataclass_fields__
            if field in fields:
                return fields[field].metadata["rule"]
        raise KeyError(name)
    return TrainConfig.__dataclass_fields__[name].metadata["rule"]


def field_ranges(cls: type | None = None) -> dict[str, str]:
    """Each field's allowed values, in words, from its rule."""
    cls = cls or TrainConfig
    kinds = _kinds(cls)
    return {f.name: f.metadata["rule"].describe(kinds[f.name]) for f in dataclasses.fields(cls)}


def field_docs(cls: type | None = None) -> dict[str, str]:
    """Each field's docstring, read from the source (Python drops attribute docstrings), then a
    "range:" line derived from the field's rule."""
    cls = cls or TrainConfig
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    if dataclasses.is_dataclass(cls) and all("rule" in f.metadata for f in dataclasses.fields(cls)):
        # continuation lines keep the source's 4-space indent, so --help-config aligns them
        ranges = field_ranges(cls)
        docs = {name: f"{doc}\n    range: {ranges[name]}" for name, doc in docs.items()}
    return docs


def help_text() -> str:
    """`anole train --help-config`: every run field, then every registered learner's fields
    (set as learner.FIELD) with their docstrings and ranges."""
    defaults = TrainConfig().to_dict()
    lines = [f"{name} = {defaults[name]!r}\n    {doc}" for name, doc in field_docs().items()
             if name != "learner_config"]
    for cls in _registry().learner_classes():
        config = cls.config_class()
        tuned = ", ".join(f"{k}={v!r}" for k, v in cls.defaults.get("learner_config", {}).items())
        lines.append(f"\nlearner {cls.name} ({cls.config_class.__name__}; set as learner.FIELD=VALUE "
                     "with this learner; values below are the class defaults"
                     + (f", `--learner {cls.name}` starts from {tuned}" if tuned else "") + "):")
        for name, doc in field_docs(cls.config_class).items():
            lines.append(f"learner.{name} = {getattr(config, name)!r}\n    {doc}")
    return "\n".join(lines)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: Any, hint: Any, name: str, source: str, rule: Rule) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError(value)
        if hint is int:
            # int(2.5) would silently truncate a YAML 2.5; int(inf) overflows
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if hint is str:
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if typing.get_args(hint)[:1] == (float,):
                return tuple(float(v) for v in value)
            return tuple(str(v).strip() for v in value)
        if origin in (types.UnionType, typing.Union):
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        return value
    raise ConfigError(f"{source}: config field '{name}' = {value!r}: must be {rule.describe(hint)}")


def config_for(learner: str | None, path: str | Path | None = None,
               overrides: list[str] | tuple[str, ...] = (), **fields: Any) -> TrainConfig:
    """The config for `learner` (default learner when None): its tuned defaults (the learner
    class's `defaults`), then the file and overrides."""
    name = learner or DEFAULT_LEARNER
    if name not in _registry().names():
        raise ConfigError(f"--learner {name!r}: must be one of {', '.join(_registry().names())}")
    base = {"learner": name, **_registry().learner_class(name).defaults}
    return TrainConfig.load(path, overrides, base=base, **fields)


def learner_names() -> tuple[str, ...]:
    """The registered learners' names."""
    return _registry().names()


__all__ = [
    "TrainConfig", "LearnerConfig", "DEFAULT_LEARNER", "config_for", "field_docs", "field_ranges",
    "Range", "OneOf", "UnitPair", "check_values", "rule_of", "shown", "migrate_config",
    "help_text", "learner_names", "knob", "FLAG",
]
