"""Lake et al. (2015) 20-way one-shot classification runs, their scoring, and two baselines.

A run folder holds one training image per class and one test image per class:

    runNN/class_labels.txt      # "runNN/test/item01.png runNN/training/class08.png" per line
    runNN/training/classJJ.png  # 105x105 binary, black ink on white
    runNN/test/itemKK.png

A classifier is any callable `classify(run) -> predicted training-class index per test item`;
`score_runs` turns it into error rates per run. Baselines: the modified Hausdorff distance
of Lake's `demo_classification` and nearest neighbour on pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import AnoleError
from pipeline.images import decode_image

__all__ = [
    "OneShotRun",
    "RunFormatError",
    "RunScores",
    "ink_points",
    "mhd_classify",
    "mhd_costs",
    "modified_hausdorff",
    "modified_hausdorff_matrix",
    "pixel_nn_classify",
    "read_run",
    "score_runs",
]

LABELS_FILE = "class_labels.txt"


class RunFormatError(AnoleError, ValueError):
    """A one-shot run folder is missing a file or has a malformed one."""


@dataclass(frozen=True, eq=False)
class OneShotRun:
    """One run: `num_train` training images (one per class) and test images to classify.

    Training class j is `train_names[j]` (files sorted by name); test item i is
    `test_names[i]` and belongs to class `test_labels[i]`.
    """

    name: str
    """The run folder's name, e.g. 'run01'."""
    path: Path
    train_names: tuple[str, ...]
    """Training file names, sorted: 'class01.png', ..."""
    test_names: tuple[str, ...]
    """Test file names, sorted: 'item01.png', ..."""
    test_labels: np.ndarray
    """int64 [num_test], the true training-class index of each test item."""
    train_ink: np.ndarray
    """bool [num_train, 105, 105], True where the pixel is ink (dark)."""
    test_ink: np.ndarray
    """bool [num_test, 105, 105]."""
    train_images: np.ndarray | None = None
    """uint8 [num_train, 1, S, S] via `decode_image` (inverted: ink 255), when read with image_size."""
    test_images: np.ndarray | None = None
    """uint8 [num_test, 1, S, S], when read with image_size."""

    @property
    def num_train(self) -> int:
        return len(self.train_names)

    @property
    def num_test(self) -> int:
        return len(self.test_names)


def _parse_labels(labels_path: Path) -> dict[str, str]:
    """{test file name: training file name} from class_labels.txt, in file order."""
    try:
        text = labels_path.read_text()
    except FileNotFoundError:
        raise RunFormatError(
            f"{labels_path} is missing: a one-shot run folder needs {LABELS_FILE}, "
            "test/ and training/ (Lake et al.'s layout)"
        ) from None
    except UnicodeDecodeError:
        raise RunFormatError(f"{labels_path} is not a text file") from None
    answers: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        parts = [Path(f).parts for f in fields]
        if (
            len(fields) != 2
            or len(parts[0]) < 2
            or len(parts[1]) < 2
            or parts[0][-2] != "test"
            or parts[1][-2] != "training"
        ):
            raise RunFormatError(
                f"{labels_path}:{lineno}: expected 'runNN/test/itemKK.png "
                f"runNN/training/classJJ.png', got {line.strip()!r}"
            )
        test_name, train_name = parts[0][-1], parts[1][-1]
        if test_name in answers:
            raise RunFormatError(f"{labels_path}:{lineno}: test item {test_name} is listed twice")
        answers[test_name] = train_name
    if not answers:
        raise RunFormatError(f"{labels_path} lists no test items")
    return answers


def _read_png(path: Path, image_size: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(bool ink mask, decoded uint8 [1, S, S] or None) for one image file."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        with Image.open(path) as img:
            ink = np.asarray(img.convert("L")) < 128  # ink is black on white
        decoded = None if image_size is None else decode_image(data, image_size=image_size)
    except FileNotFoundError:
        raise RunFormatError(f"{path} is missing") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise RunFormatError(f"{path} is not a readable image: {exc}") from None
    return ink, decoded


def _stack(arrays: list[np.ndarray], files: list[Path]) -> np.ndarray:
    first = arrays[0].shape
    for array, file in zip(arrays, files, strict=True):
        if array.shape != first:
            raise RunFormatError(
                f"{file} is {array.shape[-2]}x{array.shape[-1]} but {files[0]} is "
                f"{first[-2]}x{first[-1]}; all images of a run must have one size"
            )
    return np.stack(arrays)


def read_run(path: str | Path, *, image_size: int | None = None) -> OneShotRun:
    """Read one run folder in Lake et al.'s format.

    Every file in test/ must be listed in class_labels.txt and every listed file must exist;
    otherwise `RunFormatError` names the file. Ink masks are always read; with `image_size`
    the images are also decoded with `decode_image` (inverted so ink is 255, resized).
    """
    path = Path(path)
    if not path.is_dir():
        raise RunFormatError(f"{path} is not a folder; expected a one-shot run folder like run01/")
    labels_path = path / LABELS_FILE
    answers = _parse_labels(labels_path)

    def pngs(folder: str) -> list[str]:
        directory = path / folder
        if not directory.is_dir():
            raise RunFormatError(f"{directory} is missing; a one-shot run folder needs {folder}/")
        return sorted(p.name for p in directory.iterdir() if p.suffix.lower() == ".png")

    train_names, test_names = pngs("training"), pngs("test")
    unlisted = sorted(set(test_names) - set(answers))
    if unlisted:
        raise RunFormatError(f"{labels_path} does not list test items {unlisted}")
    for test_name, train_name in answers.items():
        if test_name not in test_names:
            raise RunFormatError(
                f"{path / 'test' / test_name} (listed in {labels_path}) is missing"
            )
        if train_name not in train_names:
            raise RunFormatError(
                f"{path / 'training' / train_name} (listed in {labels_path}) is missing"
            )
    test_labels = np.array([train_names.index(answers[name]) for name in test_names], np.int64)

    def load(folder: str, names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        files = [path / folder / name for name in names]
        read = [_read_png(f, image_size) for f in files]
        ink = _stack([r[0] for r in read], files)
        decoded = None if image_size is None else _stack([r[1] for r in read], files)
        return ink, decoded

    train_ink, train_images = load("training", train_names)
    test_ink, test_images = load("test", test_names)
    return OneShotRun(
        name=path.name,
        path=path,
        train_names=tuple(train_names),
        test_names=tuple(test_names),
        test_labels=test_labels,
        train_ink=train_ink,
        test_ink=test_ink,
        train_images=train_images,
        test_images=test_images,
    )


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class RunScores:
    """Classification error (fraction in [0, 1]) of each run and their mean."""

    names: tuple[str, ...]
    errors: tuple[float, ...]

    @property
    def mean_error(self) -> float:
        return float(np.mean(self.errors))

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": dict(zip(self.names, self.errors, strict=True)),
            "mean_error": self.mean_error,
        }

    def table(self) -> str:
        """A plain-text table: one line per run, then the mean."""
        width = max(len("mean"), *(len(n) for n in self.names))
        lines = [f"{'run':<{width}}  error"]
        lines += [
            f"{n:<{width}}  {100 * e:5.1f}%" for n, e in zip(self.names, self.errors, strict=True)
        ]
        lines.append(f"{'mean':<{width}}  {100 * self.mean_error:5.1f}%")
        return "\n".join(lines)

    def __str__(self) -> str:
        runs = ", ".join(
            f"{n} {100 * e:.1f}%" for n, e in zip(self.names, self.errors, strict=True)
        )
        return f"mean error {100 * self.mean_error:.1f}% over {len(self.names)} runs ({runs})"


def score_runs(runs: Iterable[OneShotRun], classify: Callable[[OneShotRun], Any]) -> RunScores:
    """The error of `classify` on each run: the fraction of test items assigned a wrong class.

    `classify(run)` returns one predicted training-class index per test item.
    """
    names, errors = [], []
    for run in runs:
        predicted = np.asarray(classify(run)).reshape(-1)
        if predicted.shape != (run.num_test,):
            raise ValueError(
                f"classify returned {predicted.shape[0]} predictions for {run.name}, "
                f"which has {run.num_test} test items"
            )
        names.append(run.name)
        errors.append(float(np.mean(predicted != run.test_labels)))
    if not names:
        raise ValueError("score_runs got no runs")
    return RunScores(tuple(names), tuple(errors))


# --------------------------------------------------------------------------- baselines


def ink_points(ink: np.ndarray, *, center: bool = True) -> np.ndarray:
    """float64 [n, 2] (row, col) coordinates of the ink pixels of one [H, W] mask.

    With `center`, the points' mean is subtracted (as Lake's demo does), so the distance
    ignores where on the canvas the character was drawn.
    """
    points = np.argwhere(ink).astype(np.float64)
    if center and len(points):
        points -= points.mean(axis=0)
    return points


def modified_hausdorff_matrix(
    a_sets: Sequence[np.ndarray], b_sets: Sequence[np.ndarray], *, chunk: int = 512
) -> np.ndarray:
    """float64 [len(a_sets), len(b_sets)] modified Hausdorff distances between point sets.

    MHD(A, B) = max(mean_a min_b |a - b|, mean_b min_a |a - b|) (Dubuisson & Jain, 1994).
    Each A is compared with all B sets at once: one distance block against the concatenated
    B points, `chunk` rows of A at a time, reduced per B set. The distance to or from an
    empty set is inf.
    """
    b_sizes = np.array([len(b) for b in b_sets], dtype=np.int64)
    costs = np.full((len(a_sets), len(b_sets)), np.inf)
    nonempty = np.flatnonzero(b_sizes > 0)
    if nonempty.size == 0:
        return costs
    b_points = np.concatenate([b_sets[j] for j in nonempty]).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(b_sizes[nonempty])[:-1]])
    for i, a in enumerate(a_sets):
        if len(a) == 0:
            continue
        a = np.asarray(a, dtype=np.float32)
        a_to_b = np.empty((len(a), nonempty.size), dtype=np.float32)  # min over each B, squared
        b_to_a = np.full(len(b_points), np.inf, dtype=np.float32)  # min over A, squared
        for lo in range(0, len(a), chunk):
            block = a[lo : lo + chunk]
            # Squared distances; the sqrt is taken only of the minima (it is monotone).
            d2 = (block[:, None, 0] - b_points[None, :, 0]) ** 2
            d2 += (block[:, None, 1] - b_points[None, :, 1]) ** 2
            a_to_b[lo : lo + chunk] = np.minimum.reduceat(d2, starts, axis=1)
            np.minimum(b_to_a, d2.min(axis=0), out=b_to_a)
        mean_a = np.sqrt(a_to_b, dtype=np.float64).mean(axis=0)
        mean_b = np.add.reduceat(np.sqrt(b_to_a, dtype=np.float64), starts) / b_sizes[nonempty]
        costs[i, nonempty] = np.maximum(mean_a, mean_b)
    return costs


def modified_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Modified Hausdorff distance between two [n, 2] point sets (see the matrix version)."""
    return float(modified_hausdorff_matrix([a], [b])[0, 0])


def mhd_costs(run: OneShotRun, *, center: bool = True) -> np.ndarray:
    """[num_test, num_train] modified Hausdorff distances between the runs' ink point sets."""
    test = [ink_points(ink, center=center) for ink in run.test_ink]
    train = [ink_points(ink, center=center) for ink in run.train_ink]
    return modified_hausdorff_matrix(test, train)


def mhd_classify(run: OneShotRun) -> np.ndarray:
    """Lake et al.'s baseline: each test item takes the class of the training image with the
    smallest modified Hausdorff distance between centred ink points."""
    return mhd_costs(run).argmin(axis=1)


def pixel_nn_classify(run: OneShotRun) -> np.ndarray:
    """Nearest neighbour on pixels: the training image with the smallest L2 distance to the
    test image, on the decoded (inverted, resized) images; read the run with image_size."""
    if run.train_images is None or run.test_images is None:
        raise ValueError(
            f"{run.name} was read without decoded images; use read_run(path, image_size=28)"
        )
    train = run.train_images.reshape(run.num_train, -1).astype(np.float64) / 255
    test = run.test_images.reshape(run.num_test, -1).astype(np.float64) / 255
    d2 = (test**2).sum(1)[:, None] + (train**2).sum(1)[None, :] - 2 * test @ train.T
    return d2.argmin(axis=1)
