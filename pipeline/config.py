"""The one training config: every knob of a run, saved into every checkpoint.

Load it from YAML and `key=value` overrides:

    cfg = TrainConfig.load("reptile.yaml", ["inner_steps=5", "meta_batch=16"])
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

LEARNERS = ("protonet", "reptile", "fomaml", "maml")
DEFAULT_LEARNER = "protonet"


@dataclass(frozen=True)
class TrainConfig:
    """A meta-training run: data, episodes, learner, optimisation, evaluation and bookkeeping."""

    # --- learner -------------------------------------------------------------
    learner: str = DEFAULT_LEARNER
    """Meta-learner: one of protonet, reptile, fomaml (first-order MAML), maml (second-order)."""
    inner_lr: float = 0.4
    """Fast (inner-loop) learning rate for the MAML family and Reptile."""
    inner_steps: int = 1
    """Inner-loop adaptation steps per task during meta-training."""
    inner_optimizer: str = "sgd"
    """Inner-loop optimiser for Reptile: sgd or adam (MAML variants always use SGD)."""
    inner_batches: int = 1
    """Reptile: class-balanced minibatches of each task's images, one per inner step in turn
    (2 with 1 shot + 1 query alternates support and query sets); 1 is full-batch."""
    eval_inner_steps: int = 3
    """Fine-tuning steps on the support set at evaluation (MAML family and Reptile)."""
    zero_head: bool = False
    """MAML family and Reptile: start every task's adaptation from a zero linear head (Kao et al.
    2022's zeroing trick) instead of a meta-learned one."""
    temperature: float = 1.0
    """ProtoNets: logits are -squared distance / temperature."""
    refine_steps: int = 0
    """ProtoNets at evaluation: soft k-means steps refining the prototypes with the query
    embeddings (Ren et al. 2018). Transductive, so applied only under bn_mode=transductive;
    0 keeps the support means."""
    eval_views: int = 1
    """Test-time augmentation when a checkpoint is scored (`anole evaluate`, the flows):
    log-probabilities averaged over this many views of each episode (the episode itself, plus
    random affine copies of its support and query images within the augment_* limits). 1
    disables. Validation during training, which only ranks checkpoints, uses one view."""
    bn_mode: str = "transductive"
    """BatchNorm statistics at evaluation: transductive (whole query set), per_image, or support."""

    # --- episodes ------------------------------------------------------------
    ways: int = 5
    """Classes per training episode (N in N-way)."""
    shots: int = 1
    """Support images per class in training episodes (K in K-shot)."""
    queries: int = 5
    """Query images per class in training episodes."""
    meta_batch: int = 32
    """Episodes (tasks) per meta-update."""
    sampling: str = "unstructured"
    """How a training episode picks classes: within (one domain) or unstructured (any domain)."""
    rotations: bool = True
    """Add 90/180/270-degree rotated copies of every class as new classes."""
    augment_rotate_deg: float = 0.0
    """Max random rotation (degrees) of each support/query image; 0 disables."""
    augment_translate: float = 0.0
    """Max random translation as a fraction of the image side; 0 disables."""
    augment_scale: float = 0.0
    """Max random relative zoom (0.1 = 0.9x to 1.1x); 0 disables."""
    augment_shear: float = 0.0
    """Max random horizontal shear, a slant (0.3: x moves by up to 0.3 y); 0 disables."""

    # --- data ----------------------------------------------------------------
    image_size: int = 28
    """Side of the square images fed to the network."""
    channels: int = 1
    """Image channels: 1 for Omniglot, 3 for RGB domains."""
    invert: bool = True
    """Invert intensities so strokes are 1 (Omniglot convention)."""
    domains: tuple[str, ...] = ()
    """Domains to use from the store; empty means all current domains."""
    val_domains: int = 1
    """How many domains to hold out for validation (never trained on)."""
    test_domains: int = 1
    """How many domains to hold out for testing (never trained on nor validated on)."""
    split_seed: int = 0
    """Seed of the domain-level train/val/test split."""

    # --- model ---------------------------------------------------------------
    hidden: int = 64
    """Channels of each conv4 block."""

    # --- optimisation --------------------------------------------------------
    meta_optimizer: str = "adam"
    """Outer (meta) optimiser: adam or sgd. Reptile's is set by reptile_outer."""
    meta_lr: float = 1e-3
    """Outer (meta) learning rate for adam/sgd."""
    reptile_outer: str = "anneal"
    """Reptile's meta-update of the mean (phi - theta) over tasks: anneal (plain steps with the
    linearly annealed meta step of Nichol et al.) or adam (Adam with meta_lr and lr_schedule:
    step sizes that do not depend on how far the inner loop moved)."""
    meta_step_start: float = 1.0
    """Reptile: meta step size at the first step (linearly annealed, Nichol et al.)."""
    meta_step_end: float = 0.0
    """Reptile: meta step size at the last step."""
    lr_schedule: str = "cosine"
    """Outer learning-rate schedule for adam/sgd: constant or cosine."""
    steps: int = 1000
    """Meta-updates in the run (a time budget, when given, replaces it)."""
    minutes: float = 0.0
    """Time budget in minutes; > 0 sets `steps` from the throughput measured at the start."""
    budget_clock: str = "wall"
    """Clock of the time budget: wall (elapsed time) or cpu (this process's CPU time divided by
    its torch threads: a fair budget on a machine shared with other work)."""
    seed: int = 0
    """Seed for episodes, augmentation and initialisation: same seed, same run."""
    num_threads: int = 0
    """torch CPU threads; 0 lets torch decide."""
    precision: str = "auto"
    """Convolution arithmetic: float32, bfloat16 (mixed precision: bfloat16 convolutions and
    activations, float32 parameters, statistics and loss), or auto (bfloat16 where the device
    has native bfloat16 matrix units: CPUs with AMX or AVX512-BF16, CUDA GPUs from Ampere on)."""

    # --- evaluation and bookkeeping -------------------------------------------
    val_every: int = 100
    """Meta-updates between validation runs (and best-checkpoint checks)."""
    val_episodes: int = 200
    """Episodes per validation run."""
    val_ways: int = 20
    """Ways of validation episodes (20 matches Lake's one-shot protocol)."""
    val_shots: int = 1
    """Shots of validation episodes."""
    val_sampling: str = "within"
    """Class sampling of validation and test episodes: within or unstructured."""
    checkpoint_every: int = 100
    """Meta-updates between checkpoints."""
    keep_last: int = 3
    """How many recent checkpoints to keep (the best one is kept as well)."""

    def __post_init__(self) -> None:
        checks = [
            (self.learner in LEARNERS, "learner", f"one of {', '.join(LEARNERS)}"),
            (self.inner_optimizer in ("sgd", "adam"), "inner_optimizer", "sgd or adam"),
            (self.meta_optimizer in ("sgd", "adam"), "meta_optimizer", "sgd or adam"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule", "constant or cosine"),
            (self.reptile_outer in ("anneal", "adam"), "reptile_outer", "anneal or adam"),
            (self.sampling in ("within", "unstructured"), "sampling", "within or unstructured"),
            (self.budget_clock in ("wall", "cpu"), "budget_clock", "wall or cpu"),
            (self.precision in ("auto", "float32", "bfloat16"), "precision",
             "auto, float32 or bfloat16"),
            (self.val_sampling in ("within", "unstructured"), "val_sampling", "within or unstructured"),
            (self.bn_mode in ("transductive", "per_image", "support"), "bn_mode",
             "transductive, per_image or support"),
            (self.ways >= 2, "ways", "at least 2"),
            (self.shots >= 1, "shots", "at least 1"),
            (self.queries >= 1, "queries", "at least 1"),
            (self.meta_batch >= 1, "meta_batch", "at least 1"),
            (self.inner_batches >= 1, "inner_batches", "at least 1"),
            (self.eval_views >= 1, "eval_views", "at least 1"),
            (self.refine_steps >= 0, "refine_steps", ">= 0"),
            (self.steps >= 1, "steps", "at least 1"),
            (self.minutes >= 0, "minutes", ">= 0"),
            (self.inner_steps >= 0, "inner_steps", ">= 0"),
            (self.image_size >= 8, "image_size", "at least 8"),
            (self.channels in (1, 3), "channels", "1 or 3"),
            (self.val_every >= 1, "val_every", "at least 1"),
            (self.checkpoint_every >= 1, "checkpoint_every", "at least 1"),
            (self.keep_last >= 1, "keep_last", "at least 1"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}: must be {expected}")

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
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(v, hints[k], k, source) for k, v in data.items()}
        return cls(**values)

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


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's docstring, read from the source (Python drops attribute docstrings)."""
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
    return docs


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: Any, hint: Any, name: str, source: str) -> Any:
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
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return tuple(str(v).strip() for v in value)
        if origin in (types.UnionType, typing.Union):
            return value
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{source}: config field '{name}' = {value!r} is not a valid {hint}")


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


__all__ = ["TrainConfig", "LEARNERS", "DEFAULT_LEARNER", "config_for", "field_docs"]
