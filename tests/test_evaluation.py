"""Confidence intervals, episode evaluation, Lake's one-shot runs and their baselines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.evaluation import Accuracy, evaluate_episodes, mean_ci, t_quantile_975
from pipeline.images import ImageSet
from pipeline.oneshot import (
    RunFormatError,
    RunScores,
    ink_points,
    mhd_classify,
    modified_hausdorff,
    modified_hausdorff_matrix,
    pixel_nn_classify,
    read_run,
    score_runs,
)
from pipeline.tasks import EpisodeSampler

# --------------------------------------------------------------------------- mean_ci


def test_mean_ci_uses_t_for_small_samples_and_1_96_from_30():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(3.1824 * np.std([1, 2, 3, 4], ddof=1) / 2)
    values = np.random.default_rng(0).random(600)
    mean, half = mean_ci(values)
    assert mean == pytest.approx(values.mean())
    assert half == pytest.approx(1.96 * values.std(ddof=1) / math.sqrt(600))
    assert t_quantile_975(28) == pytest.approx(2.0484) and t_quantile_975(29) == 1.96
    assert mean_ci(np.full(10, 0.8)) == (pytest.approx(0.8), 0.0)
    assert math.isnan(mean_ci([0.5])[1])
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])
    with pytest.raises(ValueError, match="nan"):
        mean_ci([1.0, float("nan")])


def test_accuracy_formats_and_serialises():
    acc = Accuracy(mean=0.9712, ci95=0.0041, episodes=600, ways=5, shots=1)
    assert str(acc) == "97.1% ± 0.4% (600 episodes, 5-way 1-shot)"
    assert Accuracy.from_dict(acc.to_dict()) == acc
    with_bn = Accuracy(0.5, 0.01, 100, 20, 5, bn_mode="transductive")
    assert str(with_bn).endswith("(100 episodes, 20-way 5-shot, bn=transductive)")
    assert with_bn.to_dict()["bn_mode"] == "transductive"
    single = Accuracy(1.0, math.nan, 1, 5, 1)
    assert single.to_dict()["ci95"] is None
    assert math.isnan(Accuracy.from_dict(single.to_dict()).ci95)


# --------------------------------------------------------------------------- evaluate_episodes


def prototype_images(num_classes: int = 12, per_class: int = 6) -> ImageSet:
    """Every image of a class is the same random pattern: a nearest-prototype rule is perfect."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (num_classes, 1, 6, 6), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    return ImageSet(
        images=patterns[labels],
        labels=labels,
        class_names=[f"d{c % 2}/c{c}" for c in range(num_classes)],
        class_domain=(np.arange(num_classes) % 2).astype(np.int32),
        domains=["d0", "d1"],
        data_version="prototypes",
    )


def nearest_prototype(episodes) -> torch.Tensor:
    T, ways, shots = episodes.num_tasks, episodes.ways, episodes.shots
    support = episodes.support_x.reshape(T, ways, shots, -1).mean(2)
    query = episodes.query_x.reshape(T, ways * episodes.queries, -1)
    return -torch.cdist(query, support)


def test_evaluate_episodes_scores_any_predictor():
    images = prototype_images()
    specs = EpisodeSampler(
        images, ways=4, shots=2, queries=3, mode="unstructured", rotations=True
    ).sample(45, seed=0)
    perfect = evaluate_episodes(nearest_prototype, images, specs, batch_size=10)
    assert (perfect.mean, perfect.ci95, perfect.episodes) == (1.0, 0.0, 45)
    assert (perfect.ways, perfect.shots) == (4, 2)

    def always_zero(episodes):
        return torch.zeros(episodes.num_tasks, episodes.ways * episodes.queries, episodes.ways)

    chance = evaluate_episodes(always_zero, images, specs, batch_size=7, bn_mode="support")
    assert chance.mean == pytest.approx(0.25) and chance.bn_mode == "support"

    def wrong_shape(episodes):
        return torch.zeros(episodes.num_tasks, episodes.ways)

    with pytest.raises(ValueError, match="expected"):
        evaluate_episodes(wrong_shape, images, specs, batch_size=10)


# --------------------------------------------------------------------------- one-shot runs


def glyph(kind: int, shift: int) -> np.ndarray:
    """A 105x105 black-on-white glyph: a horizontal bar, a vertical bar or a cross, shifted."""
    canvas = np.full((105, 105), 255, np.uint8)
    lo, hi = 30 + shift, 75 + shift
    if kind in (0, 2):
        canvas[50 + shift : 56 + shift, lo:hi] = 0
    if kind in (1, 2):
        canvas[lo:hi, 50 + shift : 56 + shift] = 0
    return canvas


def write_run(root: Path, name: str = "run01", *, labels: str | None = None):
    """A small synthetic run of three classes; test items are shifted copies of their class."""
    run = root / name
    (run / "training").mkdir(parents=True)
    (run / "test").mkdir()
    order = [1, 2, 0]  # test item i shows class order[i]
    for j in range(3):
        Image.fromarray(glyph(j, 0)).save(run / "training" / f"class{j + 1:02d}.png")
    for i, j in enumerate(order):
        Image.fromarray(glyph(j, 2)).save(run / "test" / f"item{i + 1:02d}.png")
    if labels is None:
        labels = "".join(
            f"{name}/test/item{i + 1:02d}.png {name}/training/class{j + 1:02d}.png\n"
            for i, j in enumerate(order)
        )
    (run / "class_labels.txt").write_text(labels)
    return run, order


def test_read_synthetic_run(tmp_path: Path):
    path, order = write_run(tmp_path)
    run = read_run(path, image_size=28)
    assert run.name == "run01"
    assert run.train_names == ("class01.png", "class02.png", "class03.png")
    assert run.test_names == ("item01.png", "item02.png", "item03.png")
    assert run.test_labels.tolist() == order
    assert run.train_ink.shape == (3, 105, 105) and run.train_ink.dtype == bool
    assert run.train_ink[0, 50:56, 30:75].all() and run.train_ink[0].sum() == 6 * 45
    assert run.train_images.shape == (3, 1, 28, 28) and run.train_images.max() > 200
    assert read_run(path).test_images is None
    # Test items are shifted copies of their class: both baselines get them all right.
    assert score_runs([run], mhd_classify).errors == (0.0,)
    assert score_runs([run], pixel_nn_classify).errors == (0.0,)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ("run01/test/item01.png\n", r"class_labels.txt:1: expected"),
        ("run01/test/item01.png run01/test/item02.png\n", r"class_labels.txt:1: expected"),
        (
            "run01/test/item01.png run01/training/class02.png\n"
            "run01/test/item01.png run01/training/class03.png\n",
            r"class_labels.txt:2: test item item01.png is listed twice",
        ),
        ("run01/test/item01.png run01/training/class02.png\n", r"does not list test items"),
        ("", r"lists no test items"),
        (
            "run01/test/item01.png run01/training/class02.png\n"
            "run01/test/item02.png run01/training/class03.png\n"
            "run01/test/item03.png run01/training/class09.png\n",
            r"training/class09.png \(listed in .*class_labels.txt\) is missing",
        ),
    ],
)
def test_malformed_class_labels_are_named(tmp_path: Path, labels: str, match: str):
    path, _ = write_run(tmp_path, labels=labels)
    with pytest.raises(RunFormatError, match=match):
        read_run(path)


def test_missing_and_corrupt_files_are_named(tmp_path: Path):
    with pytest.raises(RunFormatError, match="not a folder"):
        read_run(tmp_path / "nowhere")
    path, _ = write_run(tmp_path)
    (path / "test" / "item02.png").write_bytes(b"not a png")
    with pytest.raises(RunFormatError, match=r"item02.png is not a readable image"):
        read_run(path)
    (path / "class_labels.txt").unlink()
    with pytest.raises(RunFormatError, match=r"class_labels.txt is missing"):
        read_run(path)


def test_score_runs_checks_predictions(tmp_path: Path):
    run = read_run(write_run(tmp_path)[0])
    scores = score_runs([run, run], lambda r: np.zeros(r.num_test, int))
    assert scores.errors == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert scores.to_dict()["mean_error"] == pytest.approx(2 / 3)
    assert "run01" in scores.table() and "mean" in scores.table()
    with pytest.raises(ValueError, match="2 predictions"):
        score_runs([run], lambda r: [0, 1])


# --------------------------------------------------------------------------- baselines


def naive_mhd(a: np.ndarray, b: np.ndarray) -> float:
    """Dubuisson & Jain's modified Hausdorff distance, as a double loop."""
    a_to_b = [min(math.dist(p, q) for q in b) for p in a]
    b_to_a = [min(math.dist(p, q) for p in a) for q in b]
    return max(sum(a_to_b) / len(a), sum(b_to_a) / len(b))


def test_modified_hausdorff_matches_a_naive_double_loop():
    rng = np.random.default_rng(0)
    sets = [rng.integers(0, 105, (n, 2)).astype(float) for n in (1, 7, 40, 113)]
    sets.append(rng.normal(0, 20, (65, 2)))
    # Small chunks so the row blocking and the per-set reductions are both exercised.
    matrix = modified_hausdorff_matrix(sets[:3], sets, chunk=5)
    for i, a in enumerate(sets[:3]):
        for j, b in enumerate(sets):
            assert matrix[i, j] == pytest.approx(naive_mhd(a, b), rel=1e-5)
    assert modified_hausdorff(sets[2], sets[3]) == pytest.approx(naive_mhd(sets[2], sets[3]), 1e-5)
    assert modified_hausdorff(sets[1], sets[1]) == 0.0
    empty = np.zeros((0, 2))
    assert modified_hausdorff_matrix([empty, sets[0]], [sets[1], empty])[0, 0] == math.inf
    assert modified_hausdorff_matrix([sets[0]], [sets[1], empty])[0, 1] == math.inf


def test_ink_points_are_centred():
    ink = np.zeros((10, 10), bool)
    ink[2, 3] = ink[4, 7] = True
    assert ink_points(ink, center=False).tolist() == [[2, 3], [4, 7]]
    assert ink_points(ink).tolist() == [[-1, -2], [1, 2]]


def test_real_runs_and_baselines(oneshot_runs):
    runs = [read_run(path, image_size=28) for path in oneshot_runs]
    for run in runs:
        assert (run.num_train, run.num_test) == (20, 20)
        assert sorted(run.test_labels.tolist()) == list(range(20))  # one test item per class
        assert run.train_ink.shape == (20, 105, 105)
        assert 0.01 < run.train_ink.mean() < 0.2  # ink is the sparse dark strokes
    first = runs[0]
    assert first.test_names[0] == "item01.png" and first.train_names[7] == "class08.png"
    assert first.test_labels[0] == 7  # run01/test/item01.png run01/training/class08.png
    mhd = score_runs(runs, mhd_classify)
    pixels = score_runs(runs, pixel_nn_classify)
    assert isinstance(mhd, RunScores) and mhd.names == tuple(p.name for p in oneshot_runs)
    # Lake et al. report 38.8% for MHD over 20 runs, and far worse for pixel distances.
    assert 0.2 < mhd.mean_error < 0.55
    assert mhd.mean_error < pixels.mean_error < 0.95
