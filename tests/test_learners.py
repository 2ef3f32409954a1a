"""Learners and conv4: batched paths equal the per-task references; the maths is right.

Numerics run in float64 on tiny networks (hidden=6, 16x16 images) so that agreement can be
tested to ~1e-10 and finite differences are meaningful.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from pipeline.episodes import Episodes
from pipeline.learners import (
    BN_MODES,
    METRICS,
    MAMLConfig,
    ProtoNetConfig,
    ReptileConfig,
    make_learner,
    reptile_meta_step_size,
)
from pipeline.learners.base import Learner
from pipeline.models import (
    VmapNet,
    _Conv3x3,
    _MeanVar,
    conv3x3,
    conv4,
    flatten_params,
    params_of,
    resolve_precision,
    task_net,
    unflatten_params,
)

WAYS, SIZE, HIDDEN = 3, 16, 6

CONFIGS = {
    "maml": MAMLConfig(inner_lr=0.1, inner_steps=2, eval_inner_steps=2),
    "fomaml": MAMLConfig(inner_lr=0.1, inner_steps=2, eval_inner_steps=2),
    "reptile": ReptileConfig(inner_lr=0.01, inner_steps=3, eval_inner_steps=2),
    "reptile-sgd": ReptileConfig(
        inner_lr=0.1, inner_steps=3, eval_inner_steps=2, inner_optimizer="sgd"
    ),
    "protonet": ProtoNetConfig(),
    "protonet-refine": ProtoNetConfig(refine_steps=2),
    "maml-zero": MAMLConfig(inner_lr=0.1, inner_steps=2, eval_inner_steps=2, zero_head=True),
    "fomaml-zero": MAMLConfig(inner_lr=0.1, inner_steps=2, eval_inner_steps=2, zero_head=True),
    "reptile-batches": ReptileConfig(
        inner_lr=0.1, inner_steps=3, eval_inner_steps=2, inner_optimizer="sgd", inner_batches=2
    ),
    "reptile-zero": ReptileConfig(
        inner_lr=0.1, inner_steps=3, eval_inner_steps=2, inner_optimizer="sgd", zero_head=True
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is fastest, and immune to other jobs on the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def episodes(
    tasks: int = 3,
    ways: int = WAYS,
    shots: int = 2,
    queries: int = 2,
    *,
    seed: int = 0,
    dtype=torch.float64,
) -> Episodes:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Episodes(
        torch.rand(tasks, ways * shots, 1, SIZE, SIZE, generator=g, dtype=dtype),
        labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
        torch.rand(tasks, ways * queries, 1, SIZE, SIZE, generator=g, dtype=dtype),
        labels.repeat_interleave(queries).expand(tasks, -1).contiguous(),
        ways,
        shots,
        queries,
    )


def learner(
    key: str,
    backend: str = "grouped",
    *,
    ways: int = WAYS,
    hidden: int = HIDDEN,
    dtype=torch.float64,
    **kw,
) -> Learner:
    name = key.split("-")[0]
    torch.manual_seed(1)
    model = conv4(1, None if name == "protonet" else ways, hidden, SIZE).to(dtype)
    return make_learner(name, kw.pop("config", CONFIGS[key]), model=model, backend=backend, **kw)


def max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in b)


# ---------------------------------------------------------------------------------------------
# Models


def test_conv4_shapes_and_sizes() -> None:
    assert conv4()(torch.rand(4, 1, 28, 28)).shape == (4, 5)
    mini = conv4(3, 5, 32, 84)
    assert mini.embedding_size == 32 * 5 * 5
    assert mini(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    assert conv4(out_features=None)(torch.rand(2, 1, 28, 28)).shape == (2, 64)
    assert all(
        not m.track_running_stats for m in conv4().modules() if isinstance(m, torch.nn.BatchNorm2d)
    )
    assert list(conv4().buffers()) == []
    with pytest.raises(ValueError, match="image_size"):
        conv4(image_size=8)


def test_flatten_roundtrip_and_params_are_copies() -> None:
    model = conv4(hidden=8)
    params = params_of(model)
    flat = flatten_params(params)
    assert flat.shape == (sum(p.numel() for p in model.parameters()),)
    back = unflatten_params(flat, params)
    assert all(torch.equal(back[k], params[k]) for k in params)
    params["head.bias"] += 1
    assert not torch.equal(params["head.bias"], model.head.bias)
    with pytest.raises(ValueError, match="expected 1-D"):
        unflatten_params(flat[:-1], params)


@pytest.mark.parametrize("backend", ["grouped", "vmap"])
@pytest.mark.parametrize(
    "shape",
    [(1, 3, 16, HIDDEN), (1, 3, 16, 40), (3, None, 36, HIDDEN)],
    ids=["grey-head", "grey-wide-patch-moments", "rgb-embedding-2x2"],
)
def test_task_net_equals_functional_call(backend: str, shape: tuple) -> None:
    torch.manual_seed(0)
    channels, out, size, hidden = shape
    model = conv4(channels, out, hidden, size).double()
    t, n = 3, 4
    base = params_of(model)
    params = {k: v + 0.1 * torch.randn(t, *v.shape, dtype=v.dtype) for k, v in base.items()}
    params["blocks.1.norm.weight"][0, 0] = -0.5  # a negative BN scale takes the other path
    x = torch.rand(t, n, channels, size, size, dtype=torch.float64)
    support = torch.rand(t, 5, channels, size, size, dtype=torch.float64)
    net = task_net(model, backend)

    def one(k: int, images: torch.Tensor, **kw: object) -> torch.Tensor:
        return functional_call(model, {name: v[k] for name, v in params.items()}, (images,), kw)

    ref = torch.stack([one(k, x[k]) for k in range(t)])
    torch.testing.assert_close(net(params, x), ref, rtol=1e-10, atol=1e-10)
    ref = torch.stack([torch.cat([one(k, x[k, i : i + 1]) for i in range(n)]) for k in range(t)])
    torch.testing.assert_close(net(params, x, norm="image"), ref, rtol=1e-10, atol=1e-10)
    stats = net.bn_stats(params, support)
    ref = torch.stack(
        [one(k, x[k], bn_stats=one(k, support[k], return_bn_stats=True)[1]) for k in range(t)]
    )
    torch.testing.assert_close(net(params, x, norm=stats), ref, rtol=1e-10, atol=1e-10)


def test_custom_autograd_functions_are_twice_differentiable() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    conv = lambda a, b: _Conv3x3.apply(a, b, 2)  # noqa: E731
    assert torch.autograd.gradcheck(conv, (x, w))
    assert torch.autograd.gradgradcheck(conv, (x, w))
    assert torch.autograd.gradcheck(_MeanVar.apply, (x,))
    assert torch.autograd.gradgradcheck(_MeanVar.apply, (x,))


def test_shared_weight_convolution_equals_the_grouped_one_to_second_order() -> None:
    """Weights shared by all tasks (an expanded view) take one dilated convolution; value,
    gradients (per task for the weights) and second derivatives equal the grouped path's."""
    torch.manual_seed(0)
    t, c_in, c_out = 3, 2, 4
    x = torch.randn(2, t * c_in, 5, 4, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    phi = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64, requires_grad=True)

    def shared(x, phi):
        return conv3x3(x, phi.expand(t, *phi.shape), None)

    def grouped(x, phi):
        w = phi.expand(t, *phi.shape).reshape(t * c_out, c_in, 3, 3).contiguous()
        return F.conv2d(x, w, padding=1, groups=t)

    torch.testing.assert_close(shared(x, phi), grouped(x, phi), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(shared, (x, phi))
    assert torch.autograd.gradgradcheck(shared, (x, phi))
    # the inner loop's view: the gradient with respect to the expanded weights, task by task
    w = phi.detach().expand(t, *phi.shape).requires_grad_()
    gy = torch.randn(2, t * c_out, 5, 4, dtype=torch.float64)
    (g_shared,) = torch.autograd.grad(conv3x3(x, w, None), w, gy)
    w_dense = w.detach().clone().requires_grad_()
    (g_dense,) = torch.autograd.grad(conv3x3(x, w_dense, None), w_dense, gy)
    torch.testing.assert_close(g_shared, g_dense, rtol=1e-12, atol=1e-12)
    assert not torch.equal(g_shared[0], g_shared[1])  # per task, not their sum


# ---------------------------------------------------------------------------------------------
# Batched learners == per-task reference loops

KEYS = list(CONFIGS)


@pytest.mark.parametrize("backend", ["grouped", "vmap"])
@pytest.mark.parametrize("key", KEYS)
def test_meta_gradient_equals_reference_loop(key: str, backend: str) -> None:
    lrn = learner(key, backend)
    params = lrn.init_params()
    ep = episodes()
    grads, metrics = lrn.meta_gradient(params, ep)
    ref_grads, ref_metrics = lrn.reference_meta_gradient(params, ep)
    assert max_rel_err(grads, ref_grads) < 1e-9
    assert set(metrics) == set(METRICS) and metrics["tasks"] == 3
    for k in METRICS:
        assert metrics[k] == pytest.approx(ref_metrics[k], abs=1e-9)


@pytest.mark.parametrize("key", ["maml", "fomaml", "reptile", "maml-zero"])
def test_before_metrics_are_the_support_set_at_the_meta_parameters(key: str) -> None:
    """"loss_before" / "accuracy_before": the first inner step's images (here the support
    set) scored at the unadapted meta-parameters, as a plain forward pass would score them."""
    lrn = learner(key)
    if key == "reptile":  # first minibatch = the support set
        lrn = learner(key, config=replace(CONFIGS[key], train_on_query=False))
    params = lrn.init_params()
    ep = episodes()
    _, metrics = lrn.meta_gradient(params, ep)
    start = {k: v * 0.0 if key.endswith("zero") and k.startswith("head") else v
             for k, v in params.items()}
    losses, hits = [], []
    for t in range(ep.num_tasks):
        logits = functional_call(lrn.model, start, (ep.support_x[t],))
        losses.append(F.cross_entropy(logits, ep.support_y[t]).item())
        hits.append((logits.argmax(1) == ep.support_y[t]).double().mean().item())
    assert metrics["loss_before"] == pytest.approx(sum(losses), abs=1e-9)
    assert metrics["accuracy_before"] == pytest.approx(sum(hits), abs=1e-9)
    assert metrics["loss"] != pytest.approx(metrics["loss_before"])  # the query, adapted


@pytest.mark.parametrize("key", KEYS)
def test_adapt_and_predict_equals_reference_loop(key: str) -> None:
    lrn = learner(key)
    params = lrn.init_params()
    ep = episodes()
    for bn_mode in BN_MODES:
        logits = lrn.adapt_and_predict(params, ep, bn_mode=bn_mode)
        assert logits.shape == (3, WAYS * 2, WAYS)
        ref = lrn.reference_adapt_and_predict(params, ep, bn_mode=bn_mode)
        torch.testing.assert_close(logits, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("key", ["maml", "fomaml", "reptile", "protonet"])
def test_wide_first_layer_equals_reference_loop(key: str) -> None:
    """hidden >= 36 * C_in: the first BatchNorm's statistics come from input patch moments
    (and, with the fused kernels, the first convolution runs fused with its pooling)."""
    lrn = learner(key, hidden=40)
    params = lrn.init_params()
    ep = episodes(tasks=2)
    grads, _ = lrn.meta_gradient(params, ep)
    assert max_rel_err(grads, lrn.reference_meta_gradient(params, ep)[0]) < 1e-9


@pytest.mark.parametrize("key", ["maml", "fomaml", "reptile", "protonet"])
def test_learners_equal_reference_without_kernels(monkeypatch, key: str) -> None:
    """The pure-PyTorch fallback computes the same meta-gradients (wide first layer included)."""
    monkeypatch.setenv("ANOLE_KERNELS", "0")
    for hidden in (6, 40):
        lrn = learner(key, hidden=hidden)
        params = lrn.init_params()
        # the reference tests' 3 episodes: ProtoNets' last BN bias has an exactly zero
        # gradient, which is rounding noise relative to itself on some other episodes
        ep = episodes()
        grads, _ = lrn.meta_gradient(params, ep)
        assert max_rel_err(grads, lrn.reference_meta_gradient(params, ep)[0]) < 1e-9


@pytest.mark.parametrize("key", ["maml", "reptile", "protonet"])
def test_shards_and_chunks_add_up(key: str) -> None:
    lrn = learner(key)
    params = lrn.init_params()
    ep = episodes(tasks=4)
    whole, m_whole = lrn.meta_gradient(params, ep)
    a, m_a = lrn.meta_gradient(params, ep[:1])
    b, m_b = lrn.meta_gradient(params, ep[1:])
    assert max_rel_err({k: a[k] + b[k] for k in a}, whole) < 1e-10
    assert m_a["tasks"] + m_b["tasks"] == m_whole["tasks"] == 4
    assert m_a["loss"] + m_b["loss"] == pytest.approx(m_whole["loss"])
    chunked = learner(key, max_tasks_per_call=3)
    assert max_rel_err(chunked.meta_gradient(params, ep)[0], whole) < 1e-10


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile"])
def test_zero_head_starts_every_task_from_zero(name: str) -> None:
    """The head gets no meta-gradient; the meta-learned head is ignored; the body still learns."""
    lrn = learner(f"{name}-zero")
    params = lrn.init_params()
    ep = episodes()
    grads, metrics = lrn.meta_gradient(params, ep)
    assert not grads["head.weight"].any() and not grads["head.bias"].any()
    assert grads["blocks.0.conv.weight"].abs().max() > 0
    assert metrics["loss_before"] == pytest.approx(3 * math.log(WAYS))  # zero logits
    moved = {**params, "head.weight": params["head.weight"] + 1.0}
    torch.testing.assert_close(lrn.adapt_and_predict(moved, ep), lrn.adapt_and_predict(params, ep))


@pytest.mark.parametrize("key", ["maml", "fomaml", "reptile", "protonet"])
def test_bfloat16_meta_gradient_tracks_float32(key: str) -> None:
    """Mixed precision: same function up to bfloat16 rounding, gradients in the same direction."""
    cfg = {"protonet": None, "reptile": ReptileConfig(inner_lr=0.1, inner_steps=2,
                                                      inner_optimizer="sgd")}
    config = cfg.get(key, MAMLConfig(inner_lr=0.4))
    torch.manual_seed(0)
    model = conv4(1, None if key == "protonet" else 5, 32, 28)
    exact = make_learner(key, config, model=model)
    mixed = make_learner(key, config, model=model, precision="bfloat16")
    gen = torch.Generator().manual_seed(3)
    prototypes = (torch.rand(30, 28, 28, generator=gen) < 0.25).float()
    ep = synthetic_episodes(16, 5, 1, 2, gen, prototypes)
    params = exact.init_params()
    g32, m32 = exact.meta_gradient(params, ep)
    g16, m16 = mixed.meta_gradient(params, ep)
    assert all(g.dtype == torch.float32 for g in g16.values())
    flat32, flat16 = flatten_params(g32), flatten_params(g16)
    # bfloat16 keeps 8 significant bits: at initialisation, on 16 tiny tasks, the first layers'
    # gradients (sums of many cancelling terms) agree to a cosine of ~0.7-0.98, the whole to >0.9
    assert F.cosine_similarity(flat32, flat16, dim=0) > 0.9
    assert m16["loss"] == pytest.approx(m32["loss"], rel=0.05)
    logits32 = exact.adapt_and_predict(params, ep, bn_mode="support")
    logits16 = mixed.adapt_and_predict(params, ep, bn_mode="support")
    assert logits16.dtype == torch.float32
    # untrained weights: many near-ties among the 5 logits; over 5 seeds of 16 tasks, 73-87% of
    # the predictions agree (chance: 20%)
    assert (logits32.argmax(-1) == logits16.argmax(-1)).float().mean() > 0.65


def test_precision_names() -> None:
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("bfloat16") == "bfloat16"
    assert resolve_precision("auto") in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8")
    with pytest.raises(ValueError, match="precision"):
        make_learner("maml", precision="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grouped"):
        task_net(conv4(), "vmap", torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# The maths


def test_maml_meta_gradient_matches_finite_differences() -> None:
    """Second-order MAML's meta-gradient is the true gradient of the post-adaptation loss."""
    cfg = MAMLConfig(inner_lr=0.5, inner_steps=2)
    lrn = learner("maml", ways=2, hidden=4, config=cfg)
    ep = episodes(tasks=2, ways=2, shots=1, queries=2, seed=3)
    params = lrn.init_params()
    grads, _ = lrn.meta_gradient(params, ep)

    def objective(p: dict[str, torch.Tensor]) -> float:
        """Sum over tasks of the query loss after `inner_steps` SGD steps (values only)."""
        total = 0.0
        for t in range(ep.num_tasks):
            theta = {k: v.clone().requires_grad_() for k, v in p.items()}
            for _ in range(cfg.inner_steps):
                loss = F.cross_entropy(
                    functional_call(lrn.model, theta, (ep.support_x[t],)), ep.support_y[t]
                )
                g = torch.autograd.grad(loss, list(theta.values()))
                theta = {
                    k: (v - cfg.inner_lr * gi).detach().requires_grad_()
                    for (k, v), gi in zip(theta.items(), g, strict=True)
                }
            with torch.no_grad():
                total += F.cross_entropy(
                    functional_call(lrn.model, theta, (ep.query_x[t],)), ep.query_y[t]
                ).item()
        return total

    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    first_order = learner("fomaml", ways=2, hidden=4, config=cfg).meta_gradient(params, ep)[0]
    second_order_matters = False
    for name in [
        "blocks.0.conv.weight",
        "blocks.2.conv.weight",
        "blocks.3.norm.weight",
        "blocks.1.norm.bias",
        "head.weight",
    ]:
        for _ in range(2):
            i = int(torch.randint(params[name].numel(), (1,), generator=gen))
            plus = {k: v.clone() for k, v in params.items()}
            minus = {k: v.clone() for k, v in params.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            fd = (objective(plus) - objective(minus)) / (2 * eps)
            analytic = grads[name].view(-1)[i].item()
            assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, i)
            fo = first_order[name].view(-1)[i].item()
            second_order_matters |= abs(fo - fd) > 1e-4 * max(abs(fd), 1e-3)
    assert second_order_matters, "first-order MAML should differ from the true meta-gradient"


def test_fomaml_equals_maml_with_detached_inner_gradients() -> None:
    ep = episodes()
    fomaml = learner("fomaml")
    maml_fo = learner("maml", config=MAMLConfig(inner_lr=0.1, inner_steps=2, first_order=True))
    maml = learner("maml")
    params = fomaml.init_params()
    g_fo, _ = fomaml.meta_gradient(params, ep)
    assert max_rel_err(g_fo, maml_fo.meta_gradient(params, ep)[0]) < 1e-10
    assert max_rel_err(g_fo, maml.meta_gradient(params, ep)[0]) > 1e-6


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_update_equals_torch_optim_loop(optimizer: str) -> None:
    """sum_t (phi - theta_t), theta_t trained by torch.optim on a deep copy of the module."""
    cfg = ReptileConfig(
        inner_lr=0.05 if optimizer == "sgd" else 0.01,
        inner_steps=4,
        inner_optimizer=optimizer,
        adam_betas=(0.5, 0.99),
    )
    lrn = learner("reptile", config=cfg)
    ep = episodes()
    params = lrn.init_params()
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(ep.num_tasks):
        net = copy.deepcopy(lrn.model)
        if optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=cfg.inner_lr)
        else:
            opt = torch.optim.Adam(
                net.parameters(), lr=cfg.inner_lr, betas=cfg.adam_betas, eps=cfg.adam_eps
            )
        x = torch.cat([ep.support_x[t], ep.query_x[t]])
        y = torch.cat([ep.support_y[t], ep.query_y[t]])
        for _ in range(cfg.inner_steps):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        for k, p in net.named_parameters():
            expected[k] += params[k] - p.detach()
    grads, _ = lrn.meta_gradient(params, ep)
    assert max_rel_err(grads, expected) < 1e-9


def test_reptile_meta_step_size_anneals_linearly() -> None:
    assert reptile_meta_step_size(0, 100, 1.0, 0.0) == 1.0
    assert reptile_meta_step_size(50, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert reptile_meta_step_size(100, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert reptile_meta_step_size(200, 100, 1.0, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("key", ["maml", "protonet"])
def test_bn_modes_behave(key: str) -> None:
    lrn = learner(key)
    params = lrn.init_params()
    ep = episodes(tasks=2)
    other = episodes(tasks=2, seed=7)
    # Same tasks, but every query image except the first replaced by other images.
    swapped = copy.copy(ep)
    swapped.query_x = torch.cat([ep.query_x[:, :1], other.query_x[:, 1:]], 1)
    out = {m: lrn.adapt_and_predict(params, ep, bn_mode=m) for m in BN_MODES}
    out_swapped = {m: lrn.adapt_and_predict(params, swapped, bn_mode=m) for m in BN_MODES}
    assert not torch.allclose(out["per_image"], out["transductive"])
    assert not torch.allclose(out["support"], out["transductive"])
    # transductive: the first image's prediction depends on the other query images ...
    assert not torch.allclose(out["transductive"][:, 0], out_swapped["transductive"][:, 0])
    # ... per_image and support: it does not.
    for mode in ("per_image", "support"):
        torch.testing.assert_close(out[mode][:, 0], out_swapped[mode][:, 0], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="bn_mode"):
        lrn.adapt_and_predict(params, ep, bn_mode="running")  # type: ignore[arg-type]


def test_make_learner_validates() -> None:
    with pytest.raises(ValueError, match="unknown learner"):
        make_learner("matchingnet")
    with pytest.raises(ValueError, match="MAMLConfig"):
        make_learner("maml", ReptileConfig())
    # a network other than conv4 is batched by the vmap fallback (pipeline.models.task_net)
    assert isinstance(make_learner("maml", model=torch.nn.Linear(3, 3)).net, VmapNet)
    assert make_learner("protonet").model.head is None


def test_proto_logits_refinement_equals_reference_and_moves_towards_queries() -> None:
    """Soft k-means refinement: batched == class-by-class reference; prototypes follow queries."""
    from pipeline.learners.protonet import proto_logits, reference_proto_logits

    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(4, 6, 5, generator=g, dtype=torch.float64), torch.randn(
        4, 9, 5, generator=g, dtype=torch.float64
    )
    labels = torch.tensor([0, 1, 2, 0, 1, 2]).expand(4, -1)
    for steps in (0, 1, 3):
        batched = proto_logits(support, labels, query, 3, 2.0, steps)
        for t in range(4):
            ref = reference_proto_logits(support[t], labels[t], query[t], 3, 2.0, steps)
            torch.testing.assert_close(batched[t], ref, rtol=1e-12, atol=1e-12)
    # 1-D: class 0's support point at 0, class 1's at 10, queries near 2 and near 8. Refined,
    # the prototypes move to the query clusters, so the queries get nearer their prototype.
    s, y = torch.tensor([[0.0], [10.0]], dtype=torch.float64), torch.tensor([0, 1])
    q = torch.tensor([[2.0], [2.2], [8.0], [7.8]], dtype=torch.float64)
    plain, refined = proto_logits(s, y, q, 2, 1.0), proto_logits(s, y, q, 2, 1.0, 3)
    assert (refined.max(-1).values > plain.max(-1).values + 1).all()
    assert (refined.argmax(-1) == torch.tensor([0, 0, 1, 1])).all()


def test_protonet_refines_only_under_transductive_bn() -> None:
    plain, refine = learner("protonet"), learner("protonet-refine")
    params, ep = plain.init_params(), episodes()
    for bn_mode in ("per_image", "support"):
        torch.testing.assert_close(
            refine.adapt_and_predict(params, ep, bn_mode=bn_mode),
            plain.adapt_and_predict(params, ep, bn_mode=bn_mode),
        )
    transductive = refine.adapt_and_predict(params, ep, bn_mode="transductive")
    assert not torch.allclose(transductive, plain.adapt_and_predict(params, ep))
    # training never refines: the meta-gradient is the plain ProtoNet's
    grads, plain_grads = refine.meta_gradient(params, ep)[0], plain.meta_gradient(params, ep)[0]
    assert max_rel_err(grads, plain_grads) == 0


# ---------------------------------------------------------------------------------------------
# Learning


def synthetic_episodes(
    tasks: int, ways: int, shots: int, queries: int, gen: torch.Generator, prototypes: torch.Tensor
) -> Episodes:
    """Classes are fixed random binary 16x16 patterns; a sample flips 10% of the pixels."""
    classes = torch.stack(
        [torch.randperm(len(prototypes), generator=gen)[:ways] for _ in range(tasks)]
    )

    def draw(n: int) -> torch.Tensor:
        imgs = prototypes[classes].unsqueeze(2).expand(-1, -1, n, -1, -1)  # [T, ways, n, H, W]
        flip = torch.rand(imgs.shape, generator=gen) < 0.1
        return torch.where(flip, 1 - imgs, imgs).flatten(1, 2).unsqueeze(2)

    labels = torch.arange(ways)
    return Episodes(
        draw(shots),
        labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
        draw(queries),
        labels.repeat_interleave(queries).expand(tasks, -1).contiguous(),
        ways,
        shots,
        queries,
    )


@pytest.mark.parametrize("key", ["maml", "fomaml", "reptile", "protonet"])
def test_loss_falls_on_learnable_tasks(key: str) -> None:
    config = {
        "maml": MAMLConfig(inner_lr=0.4, inner_steps=1),
        "fomaml": MAMLConfig(inner_lr=0.4, inner_steps=1),
        "reptile": ReptileConfig(inner_lr=0.1, inner_steps=3, inner_optimizer="sgd"),
        "protonet": ProtoNetConfig(),
    }[key]
    lrn = learner(key, hidden=8, dtype=torch.float32, config=config)
    gen = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(30, SIZE, SIZE, generator=gen) < 0.3).float()
    params = {k: v.requires_grad_() for k, v in lrn.init_params().items()}
    opt = (
        torch.optim.SGD(params.values(), lr=1.0)
        if key == "reptile"
        else torch.optim.Adam(params.values(), lr=1e-2)
    )
    losses = []
    for _ in range(30):
        ep = synthetic_episodes(6, WAYS, 1, 2, gen, prototypes)
        grads, metrics = lrn.meta_gradient(params, ep)
        for k, p in params.items():
            p.grad = grads[k] / metrics["tasks"]
        opt.step()
        losses.append(metrics["loss"] / metrics["tasks"])  # query loss after adaptation
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)


@pytest.fixture(scope="module")
def omniglot_images(omniglot_zips, tmp_path_factory):
    """The minimal Omniglot background alphabets, through the store (skips without the data)."""
    from pipeline.store import Store

    store = Store(tmp_path_factory.mktemp("store"))
    for source in omniglot_zips:
        store.ingest(source)
    return store.load_images(image_size=28)


def test_protonet_learns_real_omniglot(omniglot_images) -> None:
    """40 meta-steps of 5-way 1-shot on the minimal Omniglot alphabets beat chance clearly."""
    from pipeline.tasks import EpisodeSampler, materialize

    torch.manual_seed(0)
    lrn = make_learner("protonet", model=conv4(1, None, 16, 28))
    sampler = EpisodeSampler(omniglot_images, ways=5, shots=1, queries=3)
    params = {k: v.requires_grad_() for k, v in lrn.init_params().items()}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    accs = []
    for step in range(40):
        ep = materialize(omniglot_images, sampler.sample(8, seed=step))
        grads, metrics = lrn.meta_gradient(params, ep)
        for k, p in params.items():
            p.grad = grads[k] / metrics["tasks"]
        opt.step()
        accs.append(metrics["accuracy"] / metrics["tasks"])
    first, last = sum(accs[:8]) / 8, sum(accs[-8:]) / 8
    assert last > first + 0.1 and last > 0.4, (first, last)  # chance is 0.2
