"""The learner platform: the registry, nested learner configs (YAML -> config -> checkpoint ->
config, --help-config, --set learner.X), old flat checkpoints, learner-owned meta-parameters,
the vmap fallback of task_net, the inner optimizer type, and the device / kernel backend.

No training and no data: every test here takes well under a second or two."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import pipeline.kernels as kernels_pkg
import pipeline.kernels.fused as fused_mod
import pipeline.models as models_mod
import pipeline.train as train_mod
from pipeline.checkpoint import CheckpointDir
from pipeline.config import (
    LearnerConfig,
    TrainConfig,
    config_for,
    help_text,
    migrate_config,
)
from pipeline.errors import ConfigError
from pipeline.learners import Learner, make_learner, registry
from pipeline.learners.optim import SGD, Adam
from pipeline.models import (
    Conv4,
    GroupedConv4,
    VmapNet,
    conv4,
    expand_params,
    params_of,
    resolve_device,
    task_net,
)
from pipeline.train import MetaOptimizer, build_learner, check_compatible, initial_params

# --- the registry ---------------------------------------------------------------------------


def test_registry_maps_names_to_classes_configs_and_valid_defaults():
    assert set(registry.names()) >= {"protonet", "reptile", "maml", "fomaml"}
    for name in registry.names():
        cls = registry.learner_class(name)
        assert issubclass(cls, Learner) and cls.name == name
        assert issubclass(cls.config_class, LearnerConfig)
        assert registry.config_class(name) is cls.config_class
        cls.config_class()  # its defaults pass its own rules
        cfg = config_for(name)  # its tuned defaults are valid run settings
        assert cfg.learner == name and type(cfg.learner_config) is cls.config_class
        own = cls.defaults.get("learner_config", {})
        assert {k: getattr(cfg.learner_config, k) for k in own} == own
    with pytest.raises(ConfigError) as info:
        registry.learner_class("svm")
    assert "'svm'" in str(info.value) and "protonet" in str(info.value)
    assert "\n" not in str(info.value)


def test_learner_hooks_replace_the_name_switches():
    assert not registry.learner_class("protonet").has_head
    assert all(registry.learner_class(n).has_head for n in ("maml", "fomaml", "reptile"))
    assert registry.learner_class("protonet").evaluation_overrides == ("refine_steps",)
    reptile = TrainConfig(learner="reptile", hidden=4)
    meta = MetaOptimizer(initial_params(reptile), reptile, total_steps=10)
    assert isinstance(meta.optimizer, torch.optim.SGD)  # anneal: plain steps
    assert meta.learning_rate(5) == pytest.approx(0.5)
    maml = TrainConfig(learner="maml", hidden=4, lr_schedule="constant", meta_lr=0.01)
    meta = MetaOptimizer(initial_params(maml), maml, total_steps=10)
    assert isinstance(meta.optimizer, torch.optim.Adam) and meta.learning_rate(5) == 0.01


# --- nested configs -------------------------------------------------------------------------


def test_nested_config_round_trips_yaml_checkpoint_and_back(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learner: reptile\nhidden: 4\nlearner_config:\n  inner_lr: 0.05\n"
                    "  adam_betas: [0.5, 0.9]\n")
    cfg = TrainConfig.load(path, ["learner.inner_steps=2", "learner.zero_head=true"])
    own = cfg.learner_config
    assert (own.inner_lr, own.inner_steps, own.zero_head, own.adam_betas) == (0.05, 2, True, (0.5, 0.9))
    # the other YAML form: a mapping under the learner key, with its name
    other = tmp_path / "other.yaml"
    other.write_text("learner:\n  name: reptile\n  inner_lr: 0.05\n  inner_steps: 2\n"
                     "  zero_head: true\n  adam_betas: [0.5, 0.9]\nhidden: 4\n")
    assert TrainConfig.load(other) == cfg
    # into a checkpoint's manifest as nested JSON, and back
    ckpts = CheckpointDir(tmp_path / "ckpt")
    saved = ckpts.save(3, {"meta": {"params": initial_params(cfg)}},
                       {"config": cfg.to_dict(), "learner": cfg.learner})
    manifest = json.loads(saved.with_suffix(".json").read_text())
    assert manifest["config"]["learner_config"]["inner_lr"] == 0.05
    assert TrainConfig.from_saved(manifest["config"]) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_help_config_lists_every_learners_fields_with_docs_and_ranges():
    text = help_text()
    for cls in registry.learner_classes():
        assert f"learner {cls.name} (" in text
        for f in dataclasses.fields(cls.config_class):
            assert f"learner.{f.name} = " in text, (cls.name, f.name)
    assert "learner.refine_steps = 0\n    At evaluation: soft k-means" in text
    assert "\n    range: an integer >= 0" in text


def test_set_of_a_field_the_learner_lacks_is_one_line_naming_its_fields():
    with pytest.raises(ConfigError) as info:
        config_for("protonet", overrides=["learner.inner_lr=0.1"])
    text = str(info.value)
    assert "\n" not in text and "'learner.inner_lr'" in text and "protonet" in text
    assert "temperature, refine_steps" in text
    with pytest.raises(ConfigError, match="set it as learner.inner_lr"):
        TrainConfig.load(None, ["inner_lr=0.1"])  # the old flat key says where it went
    with pytest.raises(ConfigError, match="must be protonet, reptile, maml, fomaml, metaopt-ridge or metaopt-svm"):
        TrainConfig.load(None, ["learner=svm"])


def test_changing_the_learner_starts_from_its_own_defaults():
    cfg = config_for("protonet", overrides=["learner=maml", "learner.inner_steps=2"])
    assert cfg.learner == "maml" and cfg.learner_config.inner_steps == 2
    assert TrainConfig().replace(learner="reptile").learner_config == registry.config_class("reptile")()


# --- checkpoints: another learner refused, the flat layout migrated -------------------------


def _flat(cfg: TrainConfig) -> dict:
    """`cfg` as anole wrote configs before nested learner configs: every learner's fields at
    the top level, with the old TrainConfig defaults where this learner has none."""
    old_defaults = {
        "inner_lr": 0.4, "inner_steps": 1, "inner_optimizer": "sgd", "inner_batches": 1,
        "eval_inner_steps": 3, "zero_head": False, "temperature": 1.0, "refine_steps": 0,
        "reptile_outer": "anneal", "meta_step_start": 1.0, "meta_step_end": 0.0,
    }
    data = cfg.to_dict()
    data.pop("device")  # added with the platform
    own = data.pop("learner_config")
    return {**data, **old_defaults, **{k: v for k, v in own.items() if k in old_defaults}}


def _checkpoint(tmp_path, config: dict, params) -> CheckpointDir:
    ckpts = CheckpointDir(tmp_path / "checkpoints")
    ckpts.save(3, {"meta": {"params": params}},
               {"config": config, "learner": config["learner"], "data_version": "v1",
                "split": {"train": ["a"], "val": [], "test": ["b"]}, "step": 3})
    return ckpts


def test_old_flat_checkpoint_loads_scores_and_resumes(tmp_path):
    from pipeline.scoring import load_model

    cfg = config_for("reptile", overrides=["hidden=4", "learner.inner_lr=0.2"])
    flat = _flat(cfg)
    assert "learner_config" not in flat and flat["inner_lr"] == 0.2 and "temperature" in flat
    migrated = migrate_config(flat)
    assert migrated["learner_config"]["inner_lr"] == 0.2 and "temperature" not in migrated
    ckpts = _checkpoint(tmp_path, flat, initial_params(cfg))
    model = load_model(ckpts.latest().path)
    assert model.config == cfg
    assert model.learner_class is registry.learner_class("reptile")
    check_compatible(ckpts.latest(), cfg, "v1")  # an old run resumes under the new layout
    with pytest.raises(ConfigError, match=r"learner\.inner_lr"):
        check_compatible(ckpts.latest(), cfg.with_learner(inner_lr=0.3), "v1")


def test_resuming_a_checkpoint_with_another_learner_is_refused_naming_both(tmp_path):
    cfg = config_for("maml", overrides=["hidden=4"])
    ckpts = _checkpoint(tmp_path, cfg.to_dict(), initial_params(cfg))
    other = config_for("reptile", overrides=["hidden=4"])
    with pytest.raises(ConfigError) as info:
        check_compatible(ckpts.latest(), other, "v1")
    text = str(info.value)
    assert "'maml'" in text and "'reptile'" in text and "\n" not in text


# --- meta-parameters owned by the learner ---------------------------------------------------


def test_learner_owns_its_parameter_template_and_initialisation():
    for name in registry.names():
        cfg = TrainConfig(learner=name, hidden=4, seed=3)
        cls = registry.learner_class(name)
        template = cls.param_template(cfg)
        params = cls.initial_params(cfg)
        assert all(t.device.type == "meta" for t in template.values())
        assert {k: t.shape for k, t in template.items()} == {k: p.shape for k, p in params.items()}
        assert ("head.weight" in params) == cls.has_head
        again = cls.initial_params(cfg)
        assert all(torch.equal(params[k], again[k]) for k in params)  # a function of the seed
    from workers.worker import param_template  # the Ray side asks the learner too

    cfg = TrainConfig(learner="protonet", hidden=4)
    assert param_template(cfg).keys() == registry.learner_class("protonet").param_template(cfg).keys()


class Wrapped(nn.Module):
    """conv4 inside another module: not a `Conv4`, so task_net takes the vmap fallback."""

    def __init__(self, inner: Conv4) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, bn_stats=None, *, return_bn_stats=False):  # noqa: ANN001, ANN201
        return self.inner(x, bn_stats, return_bn_stats=return_bn_stats)


def test_task_net_falls_back_to_vmap_for_other_networks_float64():
    torch.manual_seed(0)
    model = conv4(1, 3, 4, 16).double()
    wrapped = Wrapped(model)
    fast, slow = task_net(model), task_net(wrapped)
    assert isinstance(fast, GroupedConv4) and isinstance(slow, VmapNet)
    params = expand_params(params_of(model), 2)
    x = torch.randn(2, 6, 1, 16, 16, dtype=torch.float64)
    renamed = {f"inner.{k}": v for k, v in params.items()}
    torch.testing.assert_close(slow(renamed, x), fast(params, x), rtol=1e-10, atol=1e-10)
    # whole learners agree too: the meta-gradient of ProtoNets on the wrapped network
    embed = conv4(1, None, 4, 16).double()
    fast_l = make_learner("protonet", model=embed)
    slow_l = make_learner("protonet", model=Wrapped(embed))
    from pipeline.episodes import Episodes

    y = torch.arange(3).repeat_interleave(2).expand(2, -1).contiguous()
    ep = Episodes(torch.randn(2, 6, 1, 16, 16, dtype=torch.float64), y,
                  torch.randn(2, 6, 1, 16, 16, dtype=torch.float64), y, 3, 2, 2)
    phi = params_of(embed)
    g_fast, _ = fast_l.meta_gradient(phi, ep)
    g_slow, _ = slow_l.meta_gradient({f"inner.{k}": v for k, v in phi.items()}, ep)
    for k, g in g_fast.items():
        torch.testing.assert_close(g_slow[f"inner.{k}"], g, rtol=1e-8, atol=1e-10)


# --- the inner optimizer type ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_inner_optimizer_matches_torch_optim_float64_batched_over_tasks(kind):
    torch.manual_seed(0)
    tasks, steps = 3, 5
    start = {"w": torch.randn(tasks, 4, 3, dtype=torch.float64),
             "b": torch.randn(tasks, 3, dtype=torch.float64)}
    targets = {k: torch.randn_like(v) for k, v in start.items()}

    def grads_of(p):  # a per-task quartic loss: gradients that change with the parameters
        return {k: 4 * (p[k] - targets[k]) ** 3 + p[k] for k in p}

    opt = SGD(0.05) if kind == "sgd" else Adam(0.05, betas=(0.8, 0.95), eps=1e-6)
    params, state = dict(start), opt.init(start)
    for _ in range(steps):
        params, state = opt.update(grads_of(params), state, params)
    assert all(torch.equal(start[k], start[k].clone()) for k in start)  # inputs untouched
    for t in range(tasks):
        leaves = {k: v[t].clone().requires_grad_() for k, v in start.items()}
        ref = (torch.optim.SGD(leaves.values(), lr=0.05) if kind == "sgd" else
               torch.optim.Adam(leaves.values(), lr=0.05, betas=(0.8, 0.95), eps=1e-6))
        for _ in range(steps):
            with torch.no_grad():  # the same loss, task t alone
                g = {k: 4 * (leaves[k] - targets[k][t]) ** 3 + leaves[k] for k in leaves}
            for k, leaf in leaves.items():
                leaf.grad = g[k]
            ref.step()
        for k in leaves:
            torch.testing.assert_close(params[k][t], leaves[k].detach(), rtol=1e-12, atol=1e-12)


# --- device and kernel backend --------------------------------------------------------------


def _forbid_cpu_kernels(monkeypatch):
    def boom():
        raise AssertionError("cpu_kernels() called for a non-CPU tensor")

    for module in (kernels_pkg, models_mod, fused_mod, train_mod):
        monkeypatch.setattr(module, "cpu_kernels", boom)


def test_kernel_backend_is_picked_by_device_alone(monkeypatch):
    _forbid_cpu_kernels(monkeypatch)
    from pipeline.kernels import for_tensor, kernel_backend

    assert kernel_backend("cuda") == kernel_backend(torch.device("cuda", 1)) == "torch"
    assert kernel_backend("meta") == "torch"
    assert kernel_backend(torch.empty(2, device="meta")) == "torch"
    assert for_tensor(torch.empty(2, 3, 4, 4, device="meta")) is None
    monkeypatch.setenv("ANOLE_KERNELS", "1")
    assert kernel_backend("cpu") == kernel_backend(torch.zeros(1)) == "cpu_fused"
    monkeypatch.setenv("ANOLE_KERNELS", "0")
    assert kernel_backend("cpu") == "torch"


def test_cpu_kernels_are_never_loaded_for_a_non_cpu_tensor(monkeypatch):
    _forbid_cpu_kernels(monkeypatch)
    monkeypatch.setenv("ANOLE_KERNELS", "1")
    # a weight gradient in the wrong layout: _Cast's relayout path, on a non-CPU tensor
    w = torch.empty(8, 8, 3, 3, device="meta").contiguous(memory_format=torch.channels_last)
    out = models_mod._Cast.apply(w, torch.float32, torch.contiguous_format)
    assert out.is_contiguous() and out.device.type == "meta"
    h = torch.empty(2, 4, 6, 6, device="meta").contiguous(memory_format=torch.channels_last)
    assert not fused_mod.usable(h) and not models_mod._small_weight_grad(h, h)
    # a learner built for another device never builds nor loads the extension
    learner = build_learner(TrainConfig(learner="maml", hidden=4), torch.device("meta"))
    assert learner.precision == "float32"


def test_device_setting():
    assert TrainConfig().device == "auto" and TrainConfig(device="cuda").device == "cuda"
    with pytest.raises(ConfigError, match="'device' = 'tpu': must be auto, cpu or cuda"):
        TrainConfig.load(None, ["device=tpu"])
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
