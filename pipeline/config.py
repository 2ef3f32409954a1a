"""The one training config: every knob of a run, saved into every checkpoint.

Load it from YAML and `key=value` overrides:

    cfg = TrainConfig.load("reptile.yaml", ["inner_steps=5", "meta_batch=16"])
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

LEARNERS = ("protonet", "reptile", "fomaml", "maml")
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


@dataclass(frozen=True)
class TrainConfig:
    """A meta-training run: data, episodes, learner, optimisation, evaluation and bookkeeping."""

    # --- learner -------------------------------------------------------------
    learner: str = knob(DEFAULT_LEARNER, OneOf(LEARNERS))
    """Meta-learner: one of protonet, reptile, fomaml (first-order MAML), maml (second-order)."""
    inner_lr: float = knob(0.4, Range(gt=0))
    """Fast (inner-loop) learning rate for the MAML family and Reptile."""
    inner_steps: int = knob(1, Range(ge=0))
    """Inner-loop adaptation steps per task during meta-training."""
    inner_optimizer: str = knob("sgd", OneOf(("sgd", "adam")))
    """Inner-loop optimiser for Reptile: sgd or adam (MAML variants always use SGD)."""
    inner_batches: int = knob(1, Range(ge=1))
    """Reptile: class-balanced minibatches of each task's images, one per inner step in turn
    (2 with 1 shot + 1 query alternates support and query sets); 1 is full-batch."""
    eval_inner_steps: int = knob(3, Range(ge=0))
    """Fine-tuning steps on the support set at evaluation (MAML family and Reptile)."""
    zero_head: bool = knob(False, FLAG)
    """MAML family and Reptile: start every task's adaptation from a zero linear head (Kao et al.
    2022's zeroing trick) instead of a meta-learned one."""
    temperature: float = knob(1.0, Range(gt=0))
    """ProtoNets: logits are -squared distance / temperature."""
    refine_steps: int = knob(0, Range(ge=0))
    """ProtoNets at evaluation: soft k-means steps refining the prototypes with the query
    embeddings (Ren et al. 2018). Transductive, so applied only under bn_mode=transductive;
    0 keeps the support means."""
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
    """Outer (meta) optimiser: adam or sgd. Reptile's is set by reptile_outer."""
    meta_lr: float = knob(1e-3, Range(gt=0))
    """Outer (meta) learning rate for adam/sgd."""
    reptile_outer: str = knob("anneal", OneOf(("anneal", "adam")))
    """Reptile's meta-update of the mean (phi - theta) over tasks: anneal (plain steps with the
    linearly annealed meta step of Nichol et al.) or adam (Adam with meta_lr and lr_schedule:
    step sizes that do not depend on how far the inner loop moved)."""
    meta_step_start: float = knob(1.0, Range(gt=0, le=1))
    """Reptile: meta step size at the first step (linearly annealed, Nichol et al.)."""
    meta_step_end: float = knob(0.0, Range(ge=0, le=1))
    """Reptile: meta step size at the last step."""
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
        kinds = _kinds()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            rule: Rule = f.metadata["rule"]
            if not rule.accepts(value, kinds[f.name]):
                raise ConfigError(
                    f"config field '{f.name}' = {shown(value)}: must be "
                    f"{rule.describe(kinds[f.name])} (`anole train --help-config` lists every range)"
                )

    # --- (de)serialisation -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        out = dataclasses.asdict(self)
        out["domains"] = list(self.domains)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a dict, converting values to each field's type; unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"{source}: unknown config field(s) {unknown}; run `anole train --help-config` "
                "for the list"
            )
        hints = _kinds()
        values = {
            k: _coerce(v, hints[k], k, source, fields[k].metadata["rule"]) for k, v in data.items()
        }
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
             *, base: dict[str, Any] | None = None, **fields: Any) -> TrainConfig:
        """Defaults, then `base`, then the YAML file at `path`, then `key=value` overrides, then `fields`."""
        data: dict[str, Any] = dict(base or {})
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
            data.update(loaded)
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {item!r} must look like key=value, e.g. inner_steps=5")
            data[key.strip()] = value.strip()
        data.update({k: v for k, v in fields.items() if v is not None})
        return cls.from_dict(data, source=str(path) if path else "overrides")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@functools.cache
def _kinds() -> dict[str, Any]:
    """Each field's annotated type (resolved once: the annotations are strings)."""
    return typing.get_type_hints(TrainConfig)


def rule_of(name: str) -> Rule:
    """The rule of config field `name`: for arguments that mean the same as that field."""
    return TrainConfig.__dataclass_fields__[name].metadata["rule"]


def field_ranges() -> dict[str, str]:
    """Each field's allowed values, in words, from its rule."""
    kinds = _kinds()
    return {f.name: f.metadata["rule"].describe(kinds[f.name]) for f in dataclasses.fields(TrainConfig)}


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's docstring, read from the source (Python drops attribute docstrings), then a
    "range:" line derived from the field's rule (for TrainConfig)."""
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
    if cls is TrainConfig:
        # continuation lines keep the source's 4-space indent, so --help-config aligns them
        docs = {name: f"{doc}\n    range: {field_ranges()[name]}" for name, doc in docs.items()}
    return docs


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
            return tuple(str(v).strip() for v in value)
        if origin in (types.UnionType, typing.Union):
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        return value
    raise ConfigError(f"{source}: config field '{name}' = {value!r}: must be {rule.describe(hint)}")


# Tuned settings per learner, used when a learner is chosen without a config file. Each was
# measured in a 15-core-minute budget on the Omniglot minimal splits (benchmarks/README.md,
# "Accuracy in a CPU budget").
_AUGMENT = {"augment_rotate_deg": 10.0, "augment_translate": 0.1, "augment_scale": 0.1}
LEARNER_DEFAULTS: dict[str, dict[str, Any]] = {
    # Snell et al.'s Omniglot recipe (60-way episodes, rotations, Adam) plus small affine
    # augmentation (only six training alphabets), a 128-filter conv4 (+1 point of held-out
    # accuracy over 64), 8 test-time views (+1.5 points) and 3 soft k-means refinement steps
    # of the prototypes at evaluation (+1 to +1.5 points).
    "protonet": {
        "ways": 60, "shots": 1, "queries": 5, "meta_batch": 1, "hidden": 128, "eval_views": 8,
        "refine_steps": 3,
        **_AUGMENT, "val_every": 200, "checkpoint_every": 200, "val_episodes": 100,
    },
    # The MAML family and Reptile train a 20-way head, matching the 20-way one-shot protocol,
    # started at zero for every task (Kao et al.'s zeroing trick): one inner step then turns it
    # into class-mean features. Evaluation fine-tunes for as many steps as training did.
    "reptile": {
        "ways": 20, "shots": 1, "queries": 1, "meta_batch": 8, "zero_head": True,
        "inner_optimizer": "sgd", "inner_lr": 0.1, "inner_steps": 4, "inner_batches": 2,
        "eval_inner_steps": 10, "eval_views": 8, **_AUGMENT, "val_every": 100, "val_episodes": 100,
    },
    "fomaml": {
        "ways": 20, "shots": 1, "queries": 1, "meta_batch": 8, "zero_head": True,
        "inner_lr": 0.4, "inner_steps": 1, "eval_inner_steps": 1, "eval_views": 8,
        **_AUGMENT, "val_every": 100, "val_episodes": 100,
    },
    "maml": {
        "ways": 20, "shots": 1, "queries": 1, "meta_batch": 8, "zero_head": True,
        "inner_lr": 0.4, "inner_steps": 1, "eval_inner_steps": 1, "eval_views": 8,
        **_AUGMENT, "val_every": 100, "val_episodes": 100,
    },
}


def config_for(learner: str | None, path: str | Path | None = None,
               overrides: list[str] | tuple[str, ...] = (), **fields: Any) -> TrainConfig:
    """The config for `learner` (default learner when None): its tuned defaults, then the file and overrides."""
    name = learner or DEFAULT_LEARNER
    if name not in LEARNERS:
        raise ConfigError(f"--learner {name!r}: must be one of {', '.join(LEARNERS)}")
    base = {"learner": name, **LEARNER_DEFAULTS[name]}
    return TrainConfig.load(path, overrides, base=base, **fields)


__all__ = [
    "TrainConfig", "LEARNERS", "DEFAULT_LEARNER", "config_for", "field_docs", "field_ranges",
    "Range", "OneOf", "check_values", "rule_of", "shown",
]
