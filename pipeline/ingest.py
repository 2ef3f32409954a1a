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
import os
import re
import unicodedata
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pyarrow as pa

from pipeline.errors import IngestError, LayoutError

Progress = Callable[[int, int], None]
"""`progress(done, total)`: called as files are checked, so a CLI can draw a bar."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_IMAGE_BYTES = 64 * 1024 * 1024
"""Bigger files are refused: no few-shot image is this large, and zip bombs are."""
MAX_INGEST_BYTES = 2 * 1024**3
"""Default cap on the bytes of image files one ingest reads (2 GiB); `ANOLE_MAX_INGEST_BYTES`
overrides it. Files are streamed, so this bounds the store's growth, not the ingest's memory."""
MAX_INGEST_BYTES_ENV = "ANOLE_MAX_INGEST_BYTES"
MAX_LISTED = 20
_ERROR_LISTED = 3
"""Invalid files named in the one-line error that refuses a source."""
"""How many offending files an error message names before summarising the rest."""
MAX_REPORTED_WARNINGS = 1000
"""An `IngestReport` keeps this many warnings verbatim and only counts the rest."""
WRITE_BATCH_BYTES = 32 * 1024 * 1024
"""Images are read back from the source for writing in batches of about this many bytes."""
MAX_FOLDER_DEPTH = 32
"""Folder sources are not walked deeper than this (guards pathological symlink graphs)."""

_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_OMNIGLOT_CLASS = re.compile(r"character\d+")
_BAD_NAME_CHARS = re.compile(r"[/\\=]")
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Controls (newline, ESC), format characters (bidi overrides, zero-width), lone surrogates
(undecodable file names) and line/paragraph separators: they rewrite a terminal or a log."""
_JOINERS = frozenset("\u200c\u200d")
"""Zero-width non-joiner and joiner: format characters, but ordinary in Persian words and in
emoji, and they move no text: allowed."""
_SIZE_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

LAYOUT_HELP = (
    "anole accepts a multi-domain source, <source>/<domain>/<class>/<image> (Omniglot: "
    "<alphabet>/<character>/<id>.png), or a single-domain one, <source>/<class>/<image> (the "
    "domain named by --domain or the source's name), as "
    ".png/.jpg/.jpeg, optionally inside one wrapper folder"
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
ROW_SCHEMA = pa.schema([f for f in SCHEMA if f.name != "image"])
"""`SCHEMA` without the image bytes: what a scan keeps in memory."""


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
    """The first `MAX_REPORTED_WARNINGS` warnings, in the order they arose."""
    files_seen: int = 0
    """Candidate image files found in the source (before duplicates and skips)."""
    seconds: float = 0.0
    more_warnings: int = 0
    """Warnings beyond those in `warnings`, counted but not kept."""

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

    def warning_lines(self, limit: int = MAX_LISTED) -> list[str]:
        """The first `limit` warnings, then one line summing up the rest: what a terminal or a
        log should show (a source with 100k bad files would otherwise print 100k lines)."""
        lines = list(self.warnings[:limit])
        rest = len(self.warnings) + self.more_warnings - len(lines)
        if rest > 0:
            lines.append(
                f"... and {rest} more warning(s) ({self.skipped} invalid file(s) skipped in all); "
                f"the JSON report (--json) lists the first {len(self.warnings)}"
            )
        return lines

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
            "more_warnings": self.more_warnings,
        }


@dataclass
class ScannedDomain:
    """One domain's rows as the source has them now, ready to compare and store.

    It holds no image bytes (a source may be far larger than memory):
    `ScannedSource.tables` reads them back from the source, one batch at a time.
    """

    name: str
    table: pa.Table
    """Rows in `ROW_SCHEMA` (`SCHEMA` without the image), ordered by (class, source_path)."""
    content_hash: str
    num_classes: int
    duplicates: int = 0
    skipped: int = 0
    entries: list[_Entry] = field(default_factory=list, repr=False)
    """Where each row's file is in the source, in the order of `table`."""

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
    more_warnings: int = 0
    """Warnings beyond `MAX_REPORTED_WARNINGS`, counted but not kept."""

    def tables(self, domain: ScannedDomain, batch_bytes: int | None = None) -> Iterator[pa.Table]:
        """`domain`'s rows in `SCHEMA`, images included, in slices of about `batch_bytes`
        (default `WRITE_BATCH_BYTES`) read back from the source one file at a time.

        Raises IngestError when a file no longer has the bytes the scan checked (the source
        changed meanwhile), so what is stored is exactly what was validated.
        """
        limit = WRITE_BATCH_BYTES if batch_bytes is None else batch_bytes
        digests = domain.table.column("sha256").to_pylist()
        with _open_source(Path(self.source)) as src:
            start, blobs, size = 0, [], 0
            for i, entry in enumerate(domain.entries):
                try:
                    data = src.read(entry)
                except Exception as e:  # vanished, truncated, replaced: all the same to us
                    raise _changed(self.source, entry, _reason(e)) from None
                if hashlib.sha256(data).hexdigest() != digests[i]:
                    raise _changed(self.source, entry, "its content differs")
                blobs.append(data)
                size += len(data)
                del data
                if size >= limit or i + 1 == len(domain.entries):
                    rows = domain.table.slice(start, len(blobs))
                    images = pa.array(blobs, pa.binary())
                    start, blobs, size = i + 1, [], 0  # drop the copies Arrow now holds
                    yield rows.append_column(SCHEMA.field("image"), images)
                    del images


def _changed(source: str, entry: _Entry, why: str) -> IngestError:
    return IngestError(
        f"{entry.display} in {source} changed while it was being ingested ({why}); nothing was "
        "ingested. Run the ingest again once the source is complete."
    )


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


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in _CONTROL_CATEGORIES and ch not in _JOINERS


def has_control_chars(text: str) -> bool:
    """Whether `text` holds a control or format character (see `_CONTROL_CATEGORIES`)."""
    return any(map(_is_control, text))


def printable(text: str) -> str:
    """`text` with its control and format characters escaped (`\\n`, `\\x1b`, `\\u202e`), so a
    file name can never break a message into lines or restyle the terminal."""
    if not has_control_chars(text):
        return text
    return "".join(
        ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        if _is_control(ch)
        else ch
        for ch in text
    )


def check_domain_name(name: str, *, subject: str | None = None, kind: str = "domain") -> str:
    """Return `name` if it can name a domain (a `domain=<name>` partition folder) or, with
    `kind="class"`, a class; else raise IngestError naming `subject` and the rule."""
    if (
        not name
        or name in {".", ".."}
        or name.startswith(".")
        or name != name.strip()
        or len(name) > 200
        or _BAD_NAME_CHARS.search(name)
        or has_control_chars(name)
    ):
        subject = subject or f"{kind} name {name!r}"
        what = "a store partition" if kind == "domain" else "a class"
        alternative = " (or pass a valid domain=/--domain)" if kind == "domain" else ""
        raise IngestError(
            f"{subject} cannot name {what}: a {kind} name must be non-empty, at most 200 "
            "characters, not start with '.' or a space, and contain no '/', '\\', '=' or control "
            "or format characters (Unicode Cc/Cf, e.g. newline or ESC); nothing was ingested. "
            f"Rename it{alternative}."
        )
    return name


def max_ingest_bytes() -> int:
    """The total-bytes cap on one ingest: `$ANOLE_MAX_INGEST_BYTES` (bytes, or with a K/M/G/T
    suffix in powers of 1024), else `MAX_INGEST_BYTES` (2 GiB)."""
    raw = os.environ.get(MAX_INGEST_BYTES_ENV, "").strip()
    if not raw:
        return MAX_INGEST_BYTES
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", raw, re.IGNORECASE)
    if m is None or int(m.group(1)) == 0:
        raise IngestError(
            f"{MAX_INGEST_BYTES_ENV}={raw!r} is not a positive size; set it to a number of bytes "
            f"such as 4294967296 or 4G, or unset it for the default of {MAX_INGEST_BYTES:,} bytes."
        )
    return int(m.group(1)) * _SIZE_SUFFIXES[m.group(2).upper()]


def _over_total(source: Path, seen: int, files: int, limit: int) -> IngestError:
    return IngestError(
        f"the image files of {source} add up to {seen:,} bytes (counting {files} file(s)), over "
        f"the ingest limit of {limit:,} bytes; nothing was ingested. Raise the limit with "
        f"{MAX_INGEST_BYTES_ENV}=<bytes> (default {MAX_INGEST_BYTES:,}; K/M/G suffixes allowed), "
        "or ingest one domain at a time (domain= / --domain)."
    )


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Entry:
    """A file or folder inside a source."""

    parts: tuple[str, ...]
    """Path components relative to the source root."""
    display: str
    """The path inside the source, as stored in `source_path` and named in messages
    (control characters escaped: see `printable`)."""
    ref: Any = None
    """Whatever the source needs to read the file (ZipInfo or filesystem path)."""
    size: int = 0
    """The file's size as the source listed it (it may have grown since: `read` checks)."""


class _Source:
    """What folder and zip sources share: reading one file within the per-file cap."""

    path: Path
    warnings: list[str]

    def close(self) -> None:
        pass

    def listing(self) -> tuple[list[_Entry], list[_Entry]]:
        """(files, folders) below the source root."""
        raise NotImplementedError

    def _open(self, entry: _Entry) -> IO[bytes]:
        raise NotImplementedError

    def read(self, entry: _Entry) -> bytes:
        """The file's bytes; ValueError when it is over `MAX_IMAGE_BYTES`, whatever its listed
        size says (never reads more than one byte past the cap)."""
        if entry.size > MAX_IMAGE_BYTES:
            raise ValueError(_over_file_cap(f"{entry.size} bytes"))
        with self._open(entry) as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(_over_file_cap(f"more than {MAX_IMAGE_BYTES} bytes"))
        return data


def _over_file_cap(size: str) -> str:
    return f"{size}, over the {MAX_IMAGE_BYTES}-byte limit for one image"


class _ZipSource(_Source):
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
                dirs.setdefault(parts[:i], _Entry(parts[:i], printable("/".join(parts[:i])) + "/"))
            if not info.is_dir():
                files.append(_Entry(parts, printable(name), info, info.file_size))
        return files, list(dirs.values())

    def _open(self, entry: _Entry) -> IO[bytes]:
        return self._zip.open(entry.ref)


def _check_zip_entry(name: str, source: Path) -> None:
    """Refuse archives with entries that would land outside the extraction folder."""
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise IngestError(
            f"zip entry {name!r} in {source} points outside the archive (absolute path or '..'); "
            "nothing was ingested. Rebuild the zip with relative paths, e.g. "
            "`cd <folder> && zip -r ../data.zip .`."
        )


class _FolderSource(_Source):
    """A folder, walked without following symlink loops or links that leave it."""

    def __init__(self, path: Path):
        self.path = path
        self.warnings: list[str] = []
        self._root = os.path.realpath(path)

    def listing(self) -> tuple[list[_Entry], list[_Entry]]:
        """(files, folders). Raises IngestError on a symlink whose target is outside the root."""
        files: list[_Entry] = []
        dirs: list[_Entry] = []
        # (folder on disk, parts below the root, real paths of it and its ancestors)
        stack: list[tuple[str, tuple[str, ...], frozenset[str]]] = [
            (str(self.path), (), frozenset({self._root}))
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
                if child.is_symlink():
                    self._check_link(child.path, shown)
                try:
                    is_dir = child.is_dir(follow_symlinks=True)
                    is_file = not is_dir and child.is_file(follow_symlinks=True)
                    size = child.stat(follow_symlinks=True).st_size if is_file else 0
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
                    files.append(_Entry(sub, shown, child.path, size))
                elif child.is_symlink():
                    self.warnings.append(
                        f"skipped {shown}: symlink that cannot be resolved (missing target or a "
                        "loop); remove it or fix its target"
                    )
                else:
                    self.warnings.append(f"skipped {shown}: not a regular file or folder")
        return files, dirs

    def _check_link(self, link: str, shown: str) -> None:
        """Links within the source are followed; one that leaves it would ingest a file that
        is not part of the source (anything the user can read), so it is refused."""
        target = os.path.realpath(link)
        if os.path.commonpath([self._root, target]) != self._root:
            raise IngestError(
                f"{shown} in {self.path} is a symlink to {printable(target)}, outside the source; "
                "nothing was ingested. Copy what it points to into the source, or remove the link."
            )

    def _open(self, entry: _Entry) -> IO[bytes]:
        return open(entry.ref, "rb")

    @staticmethod
    def _show(parts: tuple[str, ...]) -> str:
        return printable(str(PurePosixPath(*parts))) if parts else "."


def _is_junk(parts: tuple[str, ...]) -> bool:
    """OS and archiver droppings (.DS_Store, __MACOSX/, Thumbs.db, hidden files) never count."""
    return any(p.startswith(".") or p in _JUNK_NAMES for p in parts)


@contextmanager
def _open_source(source: Path) -> Iterator[_Source]:
    if not source.exists():
        raise IngestError(
            f"source {source} does not exist; pass an existing folder or .zip file "
            "(e.g. images_background_small1.zip)."
        )
    if source.is_dir():
        src: _Source = _FolderSource(source)
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
        raise LayoutError(f"no .png/.jpg/.jpeg images found in {source}. {LAYOUT_HELP}.")
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
            f"is at the same depth. {LAYOUT_HELP}."
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
            f"images in a folder named after the class. {LAYOUT_HELP}."
        )
    raise LayoutError(
        f"images in {source} are {depth - 1} folders deep under more than one top folder "
        f"(e.g. {example}); expected <domain>/<class>/<image>. {LAYOUT_HELP}."
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
    max_total_bytes: int | None = None,
) -> ScannedSource:
    """Read and check every image in `source`; return the rows an ingest would store.

    Promises: either raises `IngestError`/`LayoutError` naming the offending file or folder
    and the fix, or returns domains whose every image decoded cleanly. With a multi-domain
    source `domain` selects one domain; with a single-domain source it names it. Invalid
    files raise unless `skip_invalid`, in which case each is skipped with a warning. Empty
    class folders are skipped with a warning; classes with fewer than `min_images` images are
    kept with a warning. Identical files within a domain are stored once.

    Memory stays bounded whatever the source's size: files are read, decoded and hashed one
    at a time and only their metadata is kept. The image files to read may add up to at
    most `max_total_bytes` (default `max_ingest_bytes()`: `$ANOLE_MAX_INGEST_BYTES` or 2 GiB).
    """
    if min_images < 1:
        raise IngestError(f"min_images must be at least 1, got {min_images}.")
    limit = max_ingest_bytes() if max_total_bytes is None else max_total_bytes
    if limit < 1:
        raise IngestError(f"max_total_bytes must be at least 1, got {limit}.")
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
        _check_class_names(candidates, cls_depth, src_path)
        # Refuse an oversized source from its listing, before reading a byte of it.
        readable = [
            c.entry.size
            for c in candidates
            if c.entry.size <= MAX_IMAGE_BYTES
            and c.entry.parts[-1].lower().endswith(IMAGE_EXTENSIONS)
        ]
        if sum(readable) > limit:
            raise _over_total(src_path, sum(readable), len(readable), limit)
        rows, invalid = _check_files(src, candidates, progress, limit)

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


def _check_class_names(candidates: list[_Candidate], cls_depth: int, source: Path) -> None:
    """Classes obey the domain-name rule: no control characters, no '/', '=', ... ."""
    seen: set[tuple[str, str]] = set()
    for c in candidates:
        if (c.domain, c.cls) not in seen:
            seen.add((c.domain, c.cls))
            folder = printable("/".join(c.entry.parts[:cls_depth]))
            check_domain_name(
                c.cls, kind="class", subject=f"class folder {c.cls!r} ({folder}/ in {source})"
            )


@dataclass
class _Row:
    """A checked image: what the store needs to know of it, without its bytes."""

    domain: str
    cls: str
    entry: _Entry
    digest: str
    width: int
    height: int
    num_bytes: int


def _check_files(
    src: _Source, candidates: list[_Candidate], progress: Progress | None, limit: int
) -> tuple[list[_Row], list[tuple[_Candidate, str]]]:
    """Read, hash and decode every candidate, one at a time; split into good rows and
    (candidate, reason). IngestError once the bytes read pass `limit` (the listing checked
    the listed sizes; a file may have grown since)."""
    rows: list[_Row] = []
    invalid: list[tuple[_Candidate, str]] = []
    total, read_bytes, read_files = len(candidates), 0, 0
    if progress is not None:
        progress(0, total)
    for i, c in enumerate(candidates, 1):
        if not c.entry.parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            invalid.append((c, "not a .png/.jpg/.jpeg file"))
        elif has_control_chars("".join(c.entry.parts)):
            invalid.append((c, "its name has control or format characters; rename it"))
        else:
            try:
                data = src.read(c.entry)
            except Exception as e:  # unreadable or over the cap: invalid, whatever the cause
                invalid.append((c, _reason(e)))
            else:
                read_bytes += len(data)
                read_files += 1
                if read_bytes > limit:
                    raise _over_total(src.path, read_bytes, read_files, limit)
                try:
                    width, height = _inspect_image(data)
                except Exception as e:  # any decode failure makes the file invalid
                    invalid.append((c, _reason(e)))
                else:
                    digest = hashlib.sha256(data).hexdigest()
                    rows.append(_Row(c.domain, c.cls, c.entry, digest, width, height, len(data)))
                del data  # before the next read: one file's bytes in memory at a time
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
        # One line: the first few files name the problem; --skip-invalid lists them all.
        listed = "; ".join(f"{c.entry.display}: {why}" for c, why in invalid[:_ERROR_LISTED])
        more = f" (and {len(invalid) - _ERROR_LISTED} more)" if len(invalid) > _ERROR_LISTED else ""
        raise IngestError(
            f"{len(invalid)} invalid file(s) in {src_path}, e.g. {listed}{more}; nothing was "
            "ingested: remove or replace them, or pass --skip-invalid (skip_invalid=True) to skip them with a warning"
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
                    f"duplicate image {r.entry.display} is identical to {kept.entry.display} in another "
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
                entries=[r.entry for r in ordered],
            )
        )
    if not domains:
        raise IngestError(
            f"no valid images left to ingest from {src_path} (all {files_seen} candidate files "
            f"were invalid or filtered). {LAYOUT_HELP}."
        )
    # Callers print the report's warnings themselves (logging them here too printed each one
    # twice); keep a bounded list, so 100k bad files make a count, not 100k strings.
    layout = "omniglot" if _looks_like_omniglot(domains) else "generic"
    kept = warns[:MAX_REPORTED_WARNINGS]
    return ScannedSource(str(src_path), layout, domains, kept, files_seen, len(warns) - len(kept))


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
    """The rows' metadata in `ROW_SCHEMA` (the image bytes stay in the source)."""
    return pa.table(
        {
            "domain": [r.domain for r in rows],
            "class": [r.cls for r in rows],
            "sample_id": [sample_id(r.domain, r.cls, r.digest) for r in rows],
            "source_path": [r.entry.display for r in rows],
            "sha256": [r.digest for r in rows],
            "width": pa.array([r.width for r in rows], pa.int32()),
            "height": pa.array([r.height for r in rows], pa.int32()),
            "num_bytes": pa.array([r.num_bytes for r in rows], pa.int64()),
        },
        schema=ROW_SCHEMA,
    )
