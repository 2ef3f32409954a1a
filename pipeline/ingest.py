"""Read an image source (folder or .zip), check every file, and shape it into per-domain rows.

Nothing here writes to a store: `scan_source` only reads the source and returns what an
ingest would store, plus the warnings a user should see. `pipeline.store.Store.ingest`
then decides what is new and commits it.

Accepted layouts (after descending through single wrapper folders):

* multi-domain: ``<domain>/<class>/<image>``; Omniglot is ``<alphabet>/<character>/<id>.png``
  and each alphabet becomes a domain;
* single-domain: ``<class>/<image>``; the domain is named by ``domain=`` or the source's
  folder or zip stem.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from pipeline.errors import IngestError, LayoutError

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""`progress(done, total)`: called as files are checked, so a CLI can draw a bar."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_IMAGE_BYTES = 64 * 1024 * 1024
"""Bigger files are refused: no few-shot image is this large, and zip bombs are."""
MAX_LISTED = 20
"""How many offending files an error message names before summarising the rest."""
MAX_FOLDER_DEPTH = 32
"""Folder sources are not walked deeper than this (guards pathological symlink graphs)."""

_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_OMNIGLOT_CLASS = re.compile(r"character\d+")
_BAD_NAME_CHARS = re.compile(r"[/\\=\x00-\x1f\x7f]")

LAYOUT_HELP = (
    "anole accepts two layouts (a single wrapper folder around either is fine):\n"
    "  multi-domain:  <source>/<domain>/<class>/<image>.png|jpg|jpeg   "
    "(Omniglot: <alphabet>/<character>/<id>.png)\n"
    "  single-domain: <source>/<class>/<image>.png|jpg|jpeg            "
    "(domain named by --domain or the source name)"
)

SCHEMA = pa.schema(
    [
        pa.field("domain", pa.string(), nullable=False),
        pa.field("class", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("num_bytes", pa.int64(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
    ]
)
"""Row schema of the store's Parquet files (see docs/design.md)."""


# --------------------------------------------------------------------------- public results


@dataclass(frozen=True)
class DomainOutcome:
    """What one ingest did to one domain."""

    name: str
    outcome: str
    """"new" (first version), "new version" (content changed) or "unchanged"."""
    version: int
    """The domain's current version after the ingest."""
    num_classes: int
    num_images: int
    """Unique images stored for the domain (after duplicates and skipped files)."""
    duplicates: int
    """Files dropped because an identical file (same sha256) is already in the domain."""
    skipped: int
    """Invalid files skipped (only with `skip_invalid=True`)."""
    content_hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class IngestReport:
    """The result of `Store.ingest`: one outcome per domain plus every warning raised."""

    source: str
    layout: str
    """"omniglot" or "generic"."""
    domains: tuple[DomainOutcome, ...]
    warnings: tuple[str, ...] = ()
    files_seen: int = 0
    """Candidate image files found in the source (before duplicates and skips)."""
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        """True when the ingest committed at least one new domain version."""
        return any(d.outcome != "unchanged" for d in self.domains)

    @property
    def num_images(self) -> int:
        return sum(d.num_images for d in self.domains)

    @property
    def num_classes(self) -> int:
        return sum(d.num_classes for d in self.domains)

    @property
    def duplicates(self) -> int:
        return sum(d.duplicates for d in self.domains)

    @property
    def skipped(self) -> int:
        return sum(d.skipped for d in self.domains)

    def outcome(self, name: str) -> str:
        """The outcome for domain `name`; KeyError when the ingest did not touch it."""
        for d in self.domains:
            if d.name == name:
                return d.outcome
        raise KeyError(f"domain {name!r} is not in this report: {[d.name for d in self.domains]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (for `anole ingest --json`)."""
        return {
            "source": self.source,
            "layout": self.layout,
            "changed": self.changed,
            "num_domains": len(self.domains),
            "num_classes": self.num_classes,
            "num_images": self.num_images,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "files_seen": self.files_seen,
            "seconds": round(self.seconds, 3),
            "domains": [d.to_dict() for d in self.domains],
            "warnings": list(self.warnings),
        }


@dataclass
class ScannedDomain:
    """One domain's rows as the source has them now, ready to compare and store."""

    name: str
    table: pa.Table
    """Rows in `SCHEMA`, ordered by (class, source_path)."""
    content_hash: str
    num_classes: int
    duplicates: int = 0
    skipped: int = 0

    @property
    def num_images(self) -> int:
        return self.table.num_rows


@dataclass
class ScannedSource:
    """Everything `scan_source` found: the domains to store, the layout and the warnings."""

    source: str
    layout: str
    domains: list[ScannedDomain]
    warnings: list[str] = field(default_factory=list)
    files_seen: int = 0


# --------------------------------------------------------------------------- hashing helpers


def content_hash(pairs: Iterator[tuple[str, str]] | list[tuple[str, str]]) -> str:
    """sha256 over the sorted (class, image sha256) pairs of a domain: its content identity.

    File names and order don't enter it, so re-ingesting the same images is a no-op.
    """
    h = hashlib.sha256()
    for cls, digest in sorted(pairs):
        h.update(cls.encode())
        h.update(b"\x00")
        h.update(digest.encode())
        h.update(b"\n")
    return h.hexdigest()


def sample_id(domain: str, cls: str, digest: str) -> str:
    """Stable id of a stored image, from what it is (not from where or in which order)."""
    return hashlib.sha256(f"{domain}\x00{cls}\x00{digest}".encode()).hexdigest()[:16]


def check_domain_name(name: str, *, subject: str | None = None) -> str:
    """Return `name` if it can name a `domain=<name>` partition folder, else raise IngestError."""
    if (
        not name
        or name in {".", ".."}
        or name.startswith(".")
        or name != name.strip()
        or len(name) > 200
        or _BAD_NAME_CHARS.search(name)
    ):
        subject = subject or f"domain name {name!r}"
        raise IngestError(
            f"{subject} cannot name a store partition: a domain name must be non-empty, "
            "at most 200 characters, not start with '.' or a space, and contain no '/', '\\', "
            "'=' or control characters. Rename it (or pass a valid domain=/--domain)."
        )
    return name


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Entry:
    """A file or folder inside a source."""

    parts: tuple[str, ...]
    """Path components relative to the source root."""
    display: str
    """The path inside the source, as stored in `source_path` and named in messages."""
    ref: Any = None
    """Whatever the source needs to read the file (ZipInfo or filesystem path)."""


class _ZipSource:
    """A .zip archive, read in place (never extracted)."""

    def __init__(self, path: Path):
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise IngestError(
                f"{path} is not a readable zip archive ({e}); re-download or re-create it."
            ) from e
        self.path = path
        self.warnings: list[str] = []

    def close(self) -> None:
        self._zip.close()

    def listing(self) -> tuple[list[_Entry], list[_Entry]]:
        """(files, folders). Raises IngestError on any entry that escapes the archive root."""
        files: list[_Entry] = []
        dirs: dict[tuple[str, ...], _Entry] = {}
        for info in self._zip.infolist():
            name = info.filename
            _check_zip_entry(name, self.path)
            parts = tuple(p for p in name.split("/") if p)
            if not parts or _is_junk(parts):
                continue
            # Folders are often implicit in zips: record every parent of a file too.
            for i in range(1, len(parts) if not info.is_dir() else len(parts) + 1):
                dirs.setdefault(parts[:i], _Entry(parts[:i], "/".join(parts[:i]) + "/"))
            if not info.is_dir():
                files.append(_Entry(parts, name, info))
        return files, list(dirs.values())

    def read(self, entry: _Entry) -> bytes:
        info: zipfile.ZipInfo = entry.ref
        if info.file_size > MAX_IMAGE_BYTES:
            raise ValueError(
                f"{info.file_size} bytes uncompressed, over the {MAX_IMAGE_BYTES} limit"
            )
        return self._zip.read(info)


def _check_zip_entry(name: str, source: Path) -> None:
    """Refuse archives with entries that would land outside the extraction folder."""
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise IngestError(
            f"zip entry {name!r} in {source} points outside the archive (absolute path or '..'); "
            "nothing was ingested. Rebuild the zip with relative paths, e.g. "
            "`cd <folder> && zip -r ../data.zip .`."
        )


class _FolderSource:
    """A folder, walked without following symlink loops."""

    def __init__(self, path: Path):
        self.path = path
        self.warnings: list[str] = []

    def close(self) -> None:
        pass

    def listing(self) -> tuple[list[_Entry], list[_Entry]]:
        files: list[_Entry] = []
        dirs: list[_Entry] = []
        # (folder on disk, parts below the root, real paths of it and its ancestors)
        stack: list[tuple[str, tuple[str, ...], frozenset[str]]] = [
            (str(self.path), (), frozenset({os.path.realpath(self.path)}))
        ]
        while stack:
            folder, parts, ancestors = stack.pop()
            try:
                children = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as e:
                self.warnings.append(
                    f"skipped folder {self._show(parts)}: cannot list it ({e.strerror}); "
                    "fix its permissions to include it"
                )
                continue
            for child in children:
                sub = (*parts, child.name)
                if _is_junk(sub):
                    continue
                shown = self._show(sub)
                try:
                    is_dir = child.is_dir(follow_symlinks=True)
                    is_file = not is_dir and child.is_file(follow_symlinks=True)
                except OSError:
                    is_dir = is_file = False
                if is_dir:
                    real = os.path.realpath(child.path)
                    if real in ancestors:
                        self.warnings.append(
                            f"skipped {shown}: symlink loop (it points back to {real}); "
                            "remove the link or point it elsewhere"
                        )
                    elif len(sub) > MAX_FOLDER_DEPTH:
                        self.warnings.append(
                            f"skipped {shown}: deeper than {MAX_FOLDER_DEPTH} folders"
                        )
                    else:
                        dirs.append(_Entry(sub, shown + "/"))
                        stack.append((child.path, sub, ancestors | {real}))
                elif is_file:
                    files.append(_Entry(sub, shown, child.path))
                elif child.is_symlink():
                    self.warnings.append(
                        f"skipped {shown}: symlink that cannot be resolved (missing target or a "
                        "loop); remove it or fix its target"
                    )
                else:
                    self.warnings.append(f"skipped {shown}: not a regular file or folder")
        return files, dirs

    def read(self, entry: _Entry) -> bytes:
        path: str = entry.ref
        size = os.stat(path).st_size
        if size > MAX_IMAGE_BYTES:
            raise ValueError(f"{size} bytes, over the {MAX_IMAGE_BYTES} limit")
        with open(path, "rb") as f:
            return f.read()

    @staticmethod
    def _show(parts: tuple[str, ...]) -> str:
        return str(PurePosixPath(*parts)) if parts else "."


def _is_junk(parts: tuple[str, ...]) -> bool:
    """OS and archiver droppings (.DS_Store, __MACOSX/, Thumbs.db, hidden files) never count."""
    return any(p.startswith(".") or p in _JUNK_NAMES for p in parts)


@contextmanager
def _open_source(source: Path) -> Iterator[_ZipSource | _FolderSource]:
    if not source.exists():
        raise IngestError(
            f"source {source} does not exist; pass an existing folder or .zip file "
            "(e.g. images_background_small1.zip)."
        )
    if source.is_dir():
        src: _ZipSource | _FolderSource = _FolderSource(source)
    elif source.is_file() and zipfile.is_zipfile(source):
        src = _ZipSource(source)
    else:
        raise IngestError(
            f"source {source} is neither a folder nor a .zip archive; pass a folder of images "
            "or a zip of one."
        )
    try:
        yield src
    finally:
        src.close()


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Layout:
    prefix: int
    """Wrapper folders to skip at the top."""
    multi: bool
    """True: <domain>/<class>/<image>; False: <class>/<image>."""


def _detect_layout(images: list[_Entry], source: Path) -> _Layout:
    """Find the wrapper depth and whether the source holds several domains or one."""
    if not images:
        raise LayoutError(f"no .png/.jpg/.jpeg images found in {source}.\n{LAYOUT_HELP}")
    depths = {len(e.parts) for e in images}
    prefix = 0
    # Descend through wrappers: all images deeper than domain/class/image under one folder.
    while (
        len(depths) == 1
        and min(depths) - prefix > 3
        and len({e.parts[prefix] for e in images}) == 1
    ):
        prefix += 1
    if len(depths) > 1:
        by_depth: dict[int, str] = {}
        for e in images:
            by_depth.setdefault(len(e.parts), e.display)
        examples = "; ".join(
            f"{path} ({depth - 1} folder(s) deep)" for depth, path in sorted(by_depth.items())
        )
        raise LayoutError(
            f"images in {source} sit at mixed depths, e.g. {examples}. Move them so every image "
            f"is at the same depth.\n{LAYOUT_HELP}"
        )
    depth = depths.pop() - prefix
    if depth == 3:
        return _Layout(prefix, multi=True)
    if depth == 2:
        return _Layout(prefix, multi=False)
    example = images[0].display
    if depth == 1:
        raise LayoutError(
            f"images in {source} are not in class folders (e.g. {example}); put each class's "
            f"images in a folder named after the class.\n{LAYOUT_HELP}"
        )
    raise LayoutError(
        f"images in {source} are {depth - 1} folders deep under more than one top folder "
        f"(e.g. {example}); expected <domain>/<class>/<image>.\n{LAYOUT_HELP}"
    )


def _default_domain_name(source: Path) -> str:
    return source.stem if source.is_file() else source.name


# --------------------------------------------------------------------------- checking files


def _inspect_image(data: bytes) -> tuple[int, int]:
    """Fully decode `data` (so truncated files fail here, not in training); return (w, h)."""
    from PIL import Image

    if not data:
        raise ValueError("empty file")
    with warnings.catch_warnings():
        # A decompression bomb is an invalid file, not a warning to scroll past.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.size


@dataclass
class _Candidate:
    domain: str
    cls: str
    entry: _Entry


def scan_source(
    source: str | os.PathLike[str],
    domain: str | None = None,
    *,
    skip_invalid: bool = False,
    min_images: int = 1,
    progress: Progress | None = None,
) -> ScannedSource:
    """Read and check every image in `source`; return the rows an ingest would store.

    Promises: either raises `IngestError`/`LayoutError` naming the offending file or folder
    and the fix, or returns domains whose every image decoded cleanly. With a multi-domain
    source `domain` selects one domain; with a single-domain source it names it. Invalid
    files raise unless `skip_invalid`, in which case each is skipped with a warning. Empty
    class folders are skipped with a warning; classes with fewer than `min_images` images are
    kept with a warning. Identical files within a domain are stored once.
    """
    if min_images < 1:
        raise IngestError(f"min_images must be at least 1, got {min_images}.")
    if domain is not None:
        check_domain_name(domain, subject=f"domain={domain!r}")
    src_path = Path(source).expanduser().resolve()
    with _open_source(src_path) as src:
        files, dirs = src.listing()
        warns = list(src.warnings)
        images = [e for e in files if e.parts[-1].lower().endswith(IMAGE_EXTENSIONS)]
        layout = _detect_layout(images, src_path)
        cls_depth = layout.prefix + (2 if layout.multi else 1)  # parts up to the class folder

        # Which top folders are domains, and how each maps to a stored domain name.
        rename: dict[str, str] = {}
        if layout.multi:
            found = sorted({e.parts[layout.prefix] for e in images})
            if domain is None:
                rename = {d: d for d in found}
            elif domain in found:
                rename = {domain: domain}
            elif len(found) == 1:
                rename = {found[0]: domain}  # the lone top folder is a wrapper: name its domain
            else:
                raise IngestError(
                    f"domain {domain!r} is not in {src_path}; it holds {', '.join(found)}. "
                    "Pass one of these, or none to ingest them all."
                )
            for folder in rename:
                check_domain_name(folder, subject=f"domain folder {folder!r} in {src_path}")
        else:
            name = domain or _default_domain_name(src_path)
            check_domain_name(name, subject=f"domain name {name!r} (from {src_path.name})")

        def locate(parts: tuple[str, ...]) -> tuple[str, str] | None:
            """(stored domain, class) of a path at or below class depth, or None if not selected."""
            if layout.multi:
                top = parts[layout.prefix]
                if top not in rename:
                    return None
                return rename[top], parts[layout.prefix + 1]
            return name, parts[layout.prefix]

        candidates: list[_Candidate] = []
        for e in files:
            if len(e.parts) == cls_depth + 1:
                if (where := locate(e.parts)) is not None:
                    candidates.append(_Candidate(where[0], where[1], e))
            elif not (layout.multi and len(e.parts) > layout.prefix + 1) or locate(e.parts):
                # A stray non-image file (README, labels.csv, ...) in a part we ingest.
                warns.append(f"ignored {e.display}: not an image inside a class folder")

        # Class folders as the source lists them, so empty ones can be reported.
        class_folders: dict[tuple[str, str], str] = {}
        for d in dirs:
            if len(d.parts) == cls_depth and (where := locate(d.parts)) is not None:
                class_folders[where] = d.display
        if layout.multi and domain is None:
            wrapper = images[0].parts[: layout.prefix]
            for d in dirs:
                if (
                    len(d.parts) == layout.prefix + 1
                    and d.parts[: layout.prefix] == wrapper
                    and d.parts[-1] not in rename
                ):
                    warns.append(
                        f"skipped folder {d.display}: no images in class folders under it; "
                        "add <class>/<image> files or remove it"
                    )
        domains_in_source = set(rename.values()) if layout.multi else {name}

        candidates.sort(key=lambda c: (c.domain, c.cls, c.entry.display))
        rows, invalid = _check_files(src, candidates, progress)

    return _assemble(
        src_path,
        rows,
        invalid,
        class_folders,
        domains_in_source,
        warns,
        skip_invalid=skip_invalid,
        min_images=min_images,
        files_seen=len(candidates),
    )


@dataclass
class _Row:
    domain: str
    cls: str
    display: str
    digest: str
    width: int
    height: int
    data: bytes


def _check_files(
    src: _ZipSource | _FolderSource, candidates: list[_Candidate], progress: Progress | None
) -> tuple[list[_Row], list[tuple[_Candidate, str]]]:
    """Read, hash and decode every candidate; split into good rows and (candidate, reason)."""
    rows: list[_Row] = []
    invalid: list[tuple[_Candidate, str]] = []
    total = len(candidates)
    if progress is not None:
        progress(0, total)
    for i, c in enumerate(candidates, 1):
        if not c.entry.parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            invalid.append((c, "not a .png/.jpg/.jpeg file"))
        else:
            try:
                data = src.read(c.entry)
                width, height = _inspect_image(data)
            except Exception as e:  # any decode failure makes the file invalid, whatever its type
                invalid.append((c, _reason(e)))
            else:
                digest = hashlib.sha256(data).hexdigest()
                rows.append(_Row(c.domain, c.cls, c.entry.display, digest, width, height, data))
        if progress is not None:
            progress(i, total)
    return rows, invalid


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if "cannot identify image file" in text:
        return "not a readable PNG/JPEG image"
    return text


def _assemble(
    src_path: Path,
    rows: list[_Row],
    invalid: list[tuple[_Candidate, str]],
    class_folders: dict[tuple[str, str], str],
    domains_in_source: set[str],
    warns: list[str],
    *,
    skip_invalid: bool,
    min_images: int,
    files_seen: int,
) -> ScannedSource:
    """Apply the invalid-file policy, drop duplicates, check class sizes, build tables."""
    if invalid and not skip_invalid:
        listed = "\n".join(f"  {c.entry.display}: {why}" for c, why in invalid[:MAX_LISTED])
        more = f"\n  ... and {len(invalid) - MAX_LISTED} more" if len(invalid) > MAX_LISTED else ""
        raise IngestError(
            f"{len(invalid)} invalid file(s) in {src_path}; nothing was ingested:\n{listed}{more}\n"
            "Remove or replace these files, or pass skip_invalid=True (--skip-invalid) to skip them."
        )
    skipped: dict[str, int] = {}
    for c, why in invalid:
        skipped[c.domain] = skipped.get(c.domain, 0) + 1
        warns.append(f"skipped invalid file {c.entry.display}: {why}; remove or replace it")

    by_domain: dict[str, dict[str, list[_Row]]] = {}
    duplicates: dict[str, int] = {}
    first_seen: dict[tuple[str, str], _Row] = {}
    for r in rows:  # already ordered by (domain, class, path): the first copy wins
        key = (r.domain, r.digest)
        if key in first_seen:
            duplicates[r.domain] = duplicates.get(r.domain, 0) + 1
            kept = first_seen[key]
            if kept.cls != r.cls:
                warns.append(
                    f"duplicate image {r.display} is identical to {kept.display} in another "
                    f"class; kept it only in class {kept.cls!r}. Check the labels."
                )
            continue
        first_seen[key] = r
        by_domain.setdefault(r.domain, {}).setdefault(r.cls, []).append(r)

    for (dom, cls), folder in sorted(class_folders.items()):
        if cls not in by_domain.get(dom, {}):
            why = "no valid images left" if skipped.get(dom) else "no .png/.jpg/.jpeg images"
            warns.append(
                f"skipped empty class folder {folder} ({why}); add images or remove the folder"
            )
    for dom in sorted(domains_in_source - by_domain.keys()):
        warns.append(f"skipped domain {dom!r}: none of its images are valid; fix or replace them")

    domains: list[ScannedDomain] = []
    for dom in sorted(by_domain):
        classes = by_domain[dom]
        for cls in sorted(classes):
            if len(classes[cls]) < min_images:
                warns.append(
                    f"class {dom}/{cls} has {len(classes[cls])} image(s), fewer than the "
                    f"requested minimum of {min_images}; add images or expect the sampler to "
                    "skip it for larger shot counts"
                )
        ordered = [r for cls in sorted(classes) for r in classes[cls]]
        domains.append(
            ScannedDomain(
                name=dom,
                table=_to_table(ordered),
                content_hash=content_hash([(r.cls, r.digest) for r in ordered]),
                num_classes=len(classes),
                duplicates=duplicates.get(dom, 0),
                skipped=skipped.get(dom, 0),
            )
        )
    if not domains:
        raise IngestError(
            f"no valid images left to ingest from {src_path} (all {files_seen} candidate files "
            f"were invalid or filtered).\n{LAYOUT_HELP}"
        )
    for w in warns:
        logger.warning(w)
    layout = "omniglot" if _looks_like_omniglot(domains) else "generic"
    return ScannedSource(str(src_path), layout, domains, warns, files_seen)


def _looks_like_omniglot(domains: list[ScannedDomain]) -> bool:
    """Omniglot: every file a .png and every class a `characterNN` folder."""
    for d in domains:
        paths = d.table.column("source_path").to_pylist()
        classes = set(d.table.column("class").to_pylist())
        if not all(p.lower().endswith(".png") for p in paths):
            return False
        if not all(_OMNIGLOT_CLASS.fullmatch(c) for c in classes):
            return False
    return True


def _to_table(rows: list[_Row]) -> pa.Table:
    return pa.table(
        {
            "domain": [r.domain for r in rows],
            "class": [r.cls for r in rows],
            "sample_id": [sample_id(r.domain, r.cls, r.digest) for r in rows],
            "source_path": [r.display for r in rows],
            "sha256": [r.digest for r in rows],
            "width": pa.array([r.width for r in rows], pa.int32()),
            "height": pa.array([r.height for r in rows], pa.int32()),
            "num_bytes": pa.array([len(r.data) for r in rows], pa.int64()),
            "image": pa.array([r.data for r in rows], pa.binary()),
        },
        schema=SCHEMA,
    )
