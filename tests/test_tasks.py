"""Domain splits, episode specs and pools, sampling, materialisation and augmentation."""

from __future__ import annotations

import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, SamplingError
from pipeline.images import ImageSet
from pipeline.tasks import (
    DomainSplit,
    EpisodeSampler,
    EpisodeSpecs,
    affine_augment,
    materialize,
    split_domains,
)


def make_images(
    class_sizes: dict[str, list[int]] | None = None, *, size: int = 8, seed: int = 0
) -> ImageSet:
    """A synthetic ImageSet: {domain: [images per class]} of random uint8 [1, size, size] images."""
    if class_sizes is None:
        class_sizes = {f"d{d}": [6] * (4 + 2 * d) for d in range(4)}  # 4, 6, 8, 10 classes
    rng = np.random.default_rng(seed)
    domains = sorted(class_sizes)
    labels, class_names, class_domain = [], [], []
    for d, domain in enumerate(domains):
        for count in class_sizes[domain]:
            labels += [len(class_names)] * count
            class_names.append(f"{domain}/c{len(class_names):03d}")
            class_domain.append(d)
    images = rng.integers(0, 256, (len(labels), 1, size, size), dtype=np.uint8)
    return ImageSet(
        images=images,
        labels=np.array(labels, dtype=np.int32),
        class_names=class_names,
        class_domain=np.array(class_domain, dtype=np.int32),
        domains=domains,
        data_version=f"synthetic-{seed}",
    )


@pytest.fixture(scope="module")
def images() -> ImageSet:
    return make_images()


@pytest.fixture(scope="module")
def omniglot_images(omniglot_zips, tmp_path_factory) -> ImageSet:
    """The eight background alphabets of the two minimal zips, through the store."""
    from pipeline.store import Store

    store = Store(tmp_path_factory.mktemp("store"))
    for source in omniglot_zips:
        store.ingest(source)
    return store.load_images(image_size=28)


def episode_classes(images: ImageSet, specs: EpisodeSpecs) -> np.ndarray:
    """[T, ways] class of each way, checking every image of a way has that class."""
    labels = images.labels[specs.indices]  # [T, ways, shots + queries]
    assert (labels == labels[..., :1]).all(), "a way mixes classes"
    return labels[..., 0]


# --------------------------------------------------------------------------- domain splits


def test_split_domains_is_deterministic_disjoint_and_complete():
    domains = [f"alphabet{i}" for i in range(10)]
    split = split_domains(domains, val=2, test=3, seed=7)
    assert split == split_domains(list(reversed(domains)), val=2, test=3, seed=7)
    assert (len(split.train), len(split.val), len(split.test)) == (5, 2, 3)
    assert sorted(split.all) == sorted(domains)
    assert not set(split.train) & set(split.val)
    assert not set(split.train) & set(split.test)
    assert not set(split.val) & set(split.test)
    assert len({split_domains(domains, seed=s) for s in range(10)}) > 1


def test_split_domains_accepts_explicit_lists():
    domains = ["a", "b", "c", "d", "e"]
    split = split_domains(domains, val=["b"], test=["e", "a"])
    assert split == DomainSplit(train=("c", "d"), val=("b",), test=("a", "e"))
    mixed = split_domains(domains, val=1, test=["a"], seed=3)
    assert mixed.test == ("a",) and len(mixed.val) == 1 and "a" not in mixed.val + mixed.train


def test_split_domains_errors():
    with pytest.raises(ConfigError, match="at least one train domain"):
        split_domains(["a", "b"], val=1, test=1)
    with pytest.raises(ConfigError, match="not among the domains"):
        split_domains(["a", "b", "c"], val=["z"])
    with pytest.raises(ConfigError, match="more than once"):
        split_domains(["a", "a", "b"], val=0, test=0)
    with pytest.raises(ConfigError, match="overlap"):
        split_domains(["a", "b", "c"], val=["b"], test=["b"])
    with pytest.raises(ConfigError, match="disjoint"):
        DomainSplit(train=("a",), val=("a",), test=())


def test_domain_split_dict_roundtrip():
    split = split_domains(["a", "b", "c", "d"], seed=1)
    assert DomainSplit.from_dict(split.to_dict()) == split
    with pytest.raises(ConfigError, match="unknown"):
        DomainSplit.from_dict({"train": ["a"], "holdout": ["b"]})


# --------------------------------------------------------------------------- sampling


def test_same_seed_same_specs_different_seed_different(images):
    sampler = EpisodeSampler(images, ways=3, shots=2, queries=2)
    a, b = sampler.sample(50, seed=1), sampler.sample(50, seed=1)
    assert a == b
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.task_ids, b.task_ids)
    c = sampler.sample(50, seed=2)
    assert not np.array_equal(a.indices, c.indices)
    assert not set(a.task_ids) & set(c.task_ids)
    # A fresh sampler with the same configuration gives the same episodes.
    assert EpisodeSampler(images, ways=3, shots=2, queries=2).sample(50, seed=1) == a


def test_task_ids_are_stable_and_a_shorter_sample_is_a_prefix(images):
    sampler = EpisodeSampler(images, ways=3, shots=1, queries=1, rotations=True)
    long = sampler.sample(20_000, seed=5)  # spans several random-number chunks
    assert sampler.sample(7, seed=5) == long[:7]
    assert sampler.sample(sampler._chunk + 3, seed=5) == long[: sampler._chunk + 3]
    assert np.array_equal(long.task_ids, (5 << 31) + np.arange(20_000))
    big_seed = sampler.sample(2, seed=2**32 - 1)  # train.step_seed gives 32-bit seeds
    assert (big_seed.task_ids > 0).all()
    with pytest.raises(ConfigError, match="seed"):
        sampler.sample(1, seed=-1)


def test_within_mode_draws_every_way_from_one_domain(images):
    sampler = EpisodeSampler(images, ways=4, shots=2, queries=3, mode="within")
    specs = sampler.sample(500, seed=0)
    assert specs.indices.shape == (500, 4, 5) and specs.indices.dtype == np.int32
    classes = episode_classes(images, specs)
    domains = images.class_domain[classes]
    assert (domains == domains[:, :1]).all()
    assert len(np.unique(domains[:, 0])) == 4  # every domain gets used
    assert all(len(set(row)) == 4 for row in classes)  # distinct classes
    # Images of a way are distinct, so support and query never share an image.
    flat = np.sort(specs.indices.reshape(500, -1), axis=1)
    assert (np.diff(flat, axis=1) > 0).all()
    assert (specs.rotations == 0).all()


def test_within_mode_weights_domains_by_classes_or_uniformly(images):
    counts = np.bincount(images.class_domain)  # 4, 6, 8, 10 classes
    for weighting, expected in (("classes", counts / counts.sum()), ("uniform", np.full(4, 0.25))):
        sampler = EpisodeSampler(images, ways=2, shots=1, queries=1, domain_weighting=weighting)
        classes = episode_classes(images, sampler.sample(20_000, seed=0))
        freq = np.bincount(images.class_domain[classes[:, 0]], minlength=4) / 20_000
        np.testing.assert_allclose(freq, expected, atol=0.015)


def test_unstructured_mode_mixes_domains(images):
    sampler = EpisodeSampler(images, ways=5, shots=1, queries=1, mode="unstructured")
    classes = episode_classes(images, sampler.sample(300, seed=0))
    mixed = [len(set(images.class_domain[row])) > 1 for row in classes]
    assert np.mean(mixed) > 0.5
    # Uniform over classes: every class shows up.
    assert len(np.unique(classes)) == images.num_classes


def test_domains_restrict_sampling_and_splits_do_not_share_classes(images):
    split = split_domains(images.domains, val=1, test=1, seed=0)
    seen = {}
    for part in ("train", "val", "test"):
        domains = getattr(split, part)
        for mode in ("within", "unstructured"):
            sampler = EpisodeSampler(images, ways=3, shots=1, queries=1, domains=domains, mode=mode)
            classes = episode_classes(images, sampler.sample(200, seed=0))
            used = {images.domains[d] for d in images.class_domain[classes].ravel()}
            assert used <= set(domains)
            seen.setdefault(part, set()).update(classes.ravel().tolist())
    assert not seen["train"] & seen["val"]
    assert not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]
    with pytest.raises(ConfigError, match="unknown domains"):
        EpisodeSampler(images, ways=2, shots=1, queries=1, domains=["nope"])


def test_rotations_are_new_classes_but_one_base_class_per_episode(images):
    for mode in ("within", "unstructured"):
        sampler = EpisodeSampler(images, ways=4, shots=1, queries=1, mode=mode, rotations=True)
        specs = sampler.sample(2000, seed=3)
        classes = episode_classes(images, specs)
        assert specs.rotations.dtype == np.int8
        assert set(np.unique(specs.rotations)) == {0, 1, 2, 3}
        assert all(len(set(row)) == 4 for row in classes)  # never one character twice
        # Every (class, turn) pair occurs: 4x the classes.
        pairs = set(zip(classes.ravel().tolist(), specs.rotations.ravel().tolist(), strict=True))
        assert len(pairs) == 4 * images.num_classes


def test_small_classes_are_excluded_with_a_warning_naming_them():
    images = make_images({"big": [5, 5, 5, 2], "tiny": [5, 1]})
    with pytest.warns(UserWarning, match=r"2 classes .* big/c003, tiny/c005"):
        sampler = EpisodeSampler(images, ways=2, shots=2, queries=2, mode="unstructured")
    classes = episode_classes(images, sampler.sample(200, seed=0))
    assert set(np.unique(classes)) == {0, 1, 2, 4}


def test_small_domains_are_excluded_in_within_mode():
    images = make_images({"big": [4, 4, 4], "small": [4, 4]})
    with pytest.warns(UserWarning, match=r"fewer than ways = 3 .* small \(2\)"):
        sampler = EpisodeSampler(images, ways=3, shots=1, queries=1, mode="within")
    assert sampler.sampled_domains == ("big",)
    classes = episode_classes(images, sampler.sample(50, seed=0))
    assert (images.class_domain[classes] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unstructured pools both domains: nothing excluded
        EpisodeSampler(images, ways=3, shots=1, queries=1, mode="unstructured")


def test_infeasible_request_names_the_largest_feasible_values():
    images = make_images({"a": [20, 20, 8], "b": [20, 20]})
    with pytest.raises(SamplingError, match=r"3-way 5-shot .* 15 queries") as info:
        with pytest.warns(UserWarning):
            EpisodeSampler(images, ways=3, shots=5, queries=15, mode="within")
    message = str(info.value)
    assert "at most 2 ways" in message and "shots + queries = 8" in message
    with pytest.raises(SamplingError, match="at most 4 ways"), pytest.warns(UserWarning):
        EpisodeSampler(images, ways=5, shots=5, queries=15, mode="unstructured")


def test_bad_arguments_are_config_errors(images):
    with pytest.raises(ConfigError, match="mode"):
        EpisodeSampler(images, ways=2, shots=1, queries=1, mode="across")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="shots"):
        EpisodeSampler(images, ways=2, shots=0, queries=1)


def test_sampling_is_fast():
    # Omniglot-sized: 8 domains, 242 classes of 20 images (the two minimal background zips).
    images = make_images({f"d{d}": [20] * 30 + [20] * (d % 2) for d in range(8)}, size=4)
    for mode in ("within", "unstructured"):
        sampler = EpisodeSampler(images, ways=5, shots=1, queries=15, mode=mode, rotations=True)
        sampler.sample(100, seed=0)
        start = time.perf_counter()
        sampler.sample(20_000, seed=1)
        rate = 20_000 / (time.perf_counter() - start)
        assert rate >= 10_000, f"{mode}: {rate:.0f} specs/s"


# --------------------------------------------------------------------------- specs and pools


def test_specs_slice_concat_and_validate(images):
    specs = EpisodeSampler(images, ways=3, shots=1, queries=2).sample(10, seed=0)
    assert (specs.ways, specs.num_tasks, len(specs)) == (3, 10, 10)
    shards = [specs[i::3] for i in range(3)]
    assert sum(s.num_tasks for s in shards) == 10
    assert EpisodeSpecs.concat([specs[:4], specs[4:]]) == specs
    assert specs[-1] == specs[9:10] and specs[-1].num_tasks == 1
    assert specs[np.array([2, 5])].task_ids.tolist() == specs.task_ids[[2, 5]].tolist()
    with pytest.raises(IndexError):
        specs[10]
    assert pickle.loads(pickle.dumps(specs)) == specs  # shipped to workers as is
    other = EpisodeSampler(images, ways=2, shots=1, queries=2).sample(2, seed=0)
    with pytest.raises(ValueError, match="cannot concat"):
        EpisodeSpecs.concat([specs, other])
    with pytest.raises(ValueError, match="shots \\+ queries"):
        EpisodeSpecs(specs.indices, specs.rotations, specs.task_ids, shots=2, queries=2)


def test_pool_parquet_roundtrip(images, tmp_path: Path):
    specs = EpisodeSampler(images, ways=4, shots=2, queries=3, rotations=True).sample(77, seed=9)
    path = tmp_path / "pools" / "train.parquet"
    specs.write_pool(path)
    back = EpisodeSpecs.read_pool(path)
    assert back == specs
    assert back.data_version == images.data_version
    assert back.indices.dtype == np.int32 and back.rotations.dtype == np.int8
    assert [p.name for p in path.parent.iterdir()] == ["train.parquet"]  # no temp files left
    assert EpisodeSpecs.from_table(specs.to_table()) == specs
    empty = specs[:0]
    assert EpisodeSpecs.from_table(empty.to_table()) == empty
    # A shard read back materialises the same episodes as the same slice of the whole pool.
    a, b = materialize(images, back[10:20]), materialize(images, specs[10:20])
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


def test_read_pool_errors(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(SamplingError, match="does not exist"):
        EpisodeSpecs.read_pool(tmp_path / "missing.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(SamplingError, match="not an anole task pool"):
        EpisodeSpecs.read_pool(tmp_path / "other.parquet")


# --------------------------------------------------------------------------- materialisation


def test_materialize_shapes_labels_and_pixels(images):
    sampler = EpisodeSampler(images, ways=3, shots=2, queries=4, rotations=True)
    specs = sampler.sample(40, seed=0)
    episodes = materialize(images, specs)
    T, ways, shots, queries = 40, 3, 2, 4
    assert episodes.support_x.shape == (T, ways * shots, 1, 8, 8)
    assert episodes.query_x.shape == (T, ways * queries, 1, 8, 8)
    assert episodes.support_x.dtype == torch.float32
    assert (episodes.ways, episodes.shots, episodes.queries) == (ways, shots, queries)
    assert episodes.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert episodes.query_y[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert (episodes.support_y == episodes.support_y[:1]).all()
    assert episodes.support_x.min() >= 0 and episodes.support_x.max() <= 1
    for t in range(T):
        for w in range(ways):
            turns = int(specs.rotations[t, w])
            for j, row in enumerate(specs.indices[t, w]):
                expected = np.rot90(images.images[row], turns, axes=(-2, -1)) / 255.0
                got = (
                    episodes.support_x[t, w * shots + j]
                    if j < shots
                    else episodes.query_x[t, w * queries + j - shots]
                )
                np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-7)


def test_materialize_leaves_the_image_set_untouched(images):
    before = images.images.copy()
    specs = EpisodeSampler(images, ways=3, shots=1, queries=1, rotations=True).sample(50, seed=0)
    materialize(images, specs)
    assert np.array_equal(images.images, before)


def test_materialize_options_and_errors(images):
    specs = EpisodeSampler(images, ways=2, shots=1, queries=1).sample(5, seed=0)
    half = materialize(images, specs, device="cpu", dtype=torch.float16)
    assert half.query_x.dtype == torch.float16 and half.query_y.dtype == torch.int64
    other = make_images(seed=1)
    with pytest.raises(SamplingError, match="data version"):
        materialize(other, specs)
    bad = EpisodeSpecs(specs.indices + len(images.images), specs.rotations, specs.task_ids, 1, 1)
    with pytest.raises(SamplingError, match="another ImageSet"):
        materialize(images, bad)


# --------------------------------------------------------------------------- augmentation


def test_affine_augment_identity_and_determinism():
    x = torch.rand(4, 6, 1, 16, 16)
    assert affine_augment(x) is x
    kw = dict(max_rotate_deg=15.0, max_translate=0.1, max_scale=0.1)
    a = affine_augment(x, generator=torch.Generator().manual_seed(0), **kw)
    b = affine_augment(x, generator=torch.Generator().manual_seed(0), **kw)
    c = affine_augment(x, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Independent per image: two copies of one image get different transforms.
    same = x[:1, :1].expand(1, 2, 1, 16, 16).contiguous()
    out = affine_augment(same, generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.equal(out[0, 0], out[0, 1])
    with pytest.raises(ValueError, match="max_scale"):
        affine_augment(x, max_scale=1.0)


def test_affine_augment_moves_a_dot_by_the_translation():
    x = torch.zeros(200, 1, 21, 21)
    x[:, :, 10, 10] = 1.0  # a dot at the centre
    out = affine_augment(x, max_translate=0.2, generator=torch.Generator().manual_seed(0))
    grid = torch.arange(21, dtype=torch.float32) - 10
    mass = out.sum(dim=(1, 2, 3))
    cols = (out.sum(dim=(1, 2)) * grid).sum(1) / mass
    assert torch.allclose(mass, torch.ones(200), atol=1e-4)  # bilinear keeps the ink
    assert cols.abs().max() <= 0.2 * 21 + 1e-3  # within the translation limit
    assert cols.abs().max() > 0.1 * 21  # and actually moves


def test_affine_augment_shear_slants_vertical_strokes_only():
    size = 21
    vertical = torch.zeros(100, 1, size, size)
    vertical[:, :, 3:18, 10] = 1.0
    horizontal = vertical.transpose(-1, -2).contiguous()
    kw = dict(max_shear=0.4)
    v = affine_augment(vertical, generator=torch.Generator().manual_seed(0), **kw)
    h = affine_augment(horizontal, generator=torch.Generator().manual_seed(0), **kw)
    grid = torch.arange(size, dtype=torch.float32) - 10

    def column_of_ink(img: torch.Tensor, row: int) -> torch.Tensor:  # centre of mass along x
        line = img[:, 0, row]
        return (line * grid).sum(1) / line.sum(1).clamp_min(1e-6)

    slant = column_of_ink(v, 4) - column_of_ink(v, 16)  # top vs bottom of the vertical stroke
    assert slant.abs().max() > 0.2 * 12 and slant.abs().max() <= 0.4 * 12 + 1.0
    assert torch.allclose(h[:, 0, 10].sum(1), horizontal[:, 0, 10].sum(1), atol=1e-4)  # x-shear keeps rows
    # shear-free draws are unchanged by the new option
    kw2 = dict(max_rotate_deg=10.0, max_translate=0.1)
    a = affine_augment(vertical, generator=torch.Generator().manual_seed(1), **kw2)
    b = affine_augment(vertical, generator=torch.Generator().manual_seed(1), max_shear=0.0, **kw2)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- real Omniglot


def test_real_omniglot_within_alphabet_sampling(omniglot_images):
    images = omniglot_images
    assert images.images.shape == (4840, 1, 28, 28) and len(images.domains) == 8
    split = split_domains(images.domains, val=1, test=1, seed=0)
    # Tagalog has 17 characters: too few for 20-way within-alphabet episodes.
    with pytest.warns(UserWarning, match=r"Tagalog \(17\)"):
        sampler = EpisodeSampler(images, ways=20, shots=1, queries=5, mode="within")
    assert "Tagalog" not in sampler.sampled_domains
    specs = sampler.sample(200, seed=0)
    domains = images.class_domain[episode_classes(images, specs)]
    assert (domains == domains[:, :1]).all()
    train = EpisodeSampler(
        images, ways=5, shots=1, queries=15, domains=split.train, mode="unstructured"
    )
    episodes = materialize(images, train.sample(16, seed=0))
    assert episodes.support_x.shape == (16, 5, 1, 28, 28)
    assert episodes.query_x.shape == (16, 75, 1, 28, 28)
    # Inverted Omniglot: mostly background (0), some ink near 1.
    assert 0.02 < episodes.support_x.mean() < 0.4 and episodes.support_x.max() > 0.9
