"""Issue 13, ingestion: every probe as a test.

Each one feeds a bad source (too many bytes, a link out of the source, a control character in a
name, 300 bad files, a full disk) and checks the exit code or error, that the message is one
line without a traceback, and that the store is byte for byte what it was.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_ingest import generic_files, image_bytes, make_tree, make_zip
from typer.testing import CliRunner

import pipeline.ingest as ingest_module
import pipeline.store as store_module
from flows.cli import app
from pipeline import atomic
from pipeline.errors import DiskFullError, IngestError
from pipeline.store import Store


def store_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under the store root, the lock included."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def store(tmp_path) -> Store:
    """A store that already holds one domain, so "unchanged" means something."""
    s = Store(tmp_path / "store")
    s.ingest(make_tree(tmp_path / "first", generic_files(domains=("first",))))
    return s


def cli(*args: str, env: dict[str, str] | None = None):
    """`anole ARGS` in this process (fast; monkeypatches apply)."""
    return CliRunner().invoke(app, list(args), env={"ANOLE_PROGRESS": "0", **(env or {})})


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2, one `error:` line on stderr naming every needle, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def padded_png(seed: int, size: int) -> bytes:
    """A valid PNG made `size` bytes long with zeros after its end: the memory probe's file."""
    img = Image.new("L", (8, 8), color=seed % 256)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    return data + b"\0" * (size - len(data))


def padded_zip(path: Path, count: int, size: int) -> Path:
    return make_zip(path, {f"probe/c{i % 2}/img{i}.png": padded_png(i, size) for i in range(count)})


# ----------------------------------------------------------------------------- memory and total


def test_ingest_streams_one_file_at_a_time(tmp_path, monkeypatch):
    # The probe in small: 8 PNGs padded to 1 MB. The old code held every file's bytes (twice)
    # until the write; now the scan keeps metadata only and the write reads them back in
    # batches (here one file each), so Python never holds more than a couple of files.
    size, count = 1_000_000, 8
    src = padded_zip(tmp_path / "padded.zip", count, size)
    monkeypatch.setattr(ingest_module, "WRITE_BATCH_BYTES", 1)
    store = Store(tmp_path / "store")
    tracemalloc.start()
    try:
        report = store.ingest(src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.num_images == count
    assert peak < count * size / 2, f"peak {peak:,} bytes for {count} files of {size:,}"
    (info,) = store.domains()
    part = pq.ParquetFile(store.root / info.path)
    assert part.metadata.num_row_groups == count  # one batch per file, as asked
    table = store.read_table()
    assert sorted(table.column("image").to_pylist()) == sorted(
        padded_png(i, size) for i in range(count)
    )


def test_total_bytes_cap_names_limit_total_and_setting(store, tmp_path, monkeypatch):
    src = padded_zip(tmp_path / "padded.zip", 4, 300_000)
    before = store_hashes(store.root)
    with pytest.raises(IngestError) as err:
        store.ingest(src, max_total_bytes=1_000_000)
    message = str(err.value)
    assert "1,200,000 bytes" in message and "1,000,000 bytes" in message
    assert "ANOLE_MAX_INGEST_BYTES" in message and "\n" not in message
    # The same through the environment and the CLI; K/M/G suffixes are powers of 1024.
    result = cli("ingest", str(src), "--store", str(store.root),
                 env={"ANOLE_MAX_INGEST_BYTES": "1M"})
    assert_one_line_error(result, "1,200,000 bytes", "1,048,576 bytes", "ANOLE_MAX_INGEST_BYTES")
    assert store_hashes(store.root) == before
    monkeypatch.setenv("ANOLE_MAX_INGEST_BYTES", "2M")
    assert store.ingest(src).num_images == 4  # under the raised limit it goes in


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5G"])
def test_bad_total_bytes_setting_is_one_line(store, tmp_path, value):
    before = store_hashes(store.root)
    result = cli("ingest", str(tmp_path / "first"), "--store", str(store.root),
                 env={"ANOLE_MAX_INGEST_BYTES": value})
    assert_one_line_error(result, f"ANOLE_MAX_INGEST_BYTES={value!r}", "4G")
    assert store_hashes(store.root) == before


def test_total_bytes_cap_holds_when_listed_sizes_lie(store, tmp_path, monkeypatch):
    # A source whose listing understates its files (a file grown since it was listed) is
    # still stopped by the bytes actually read.
    src = padded_zip(tmp_path / "padded.zip", 4, 300_000)
    real_listing = ingest_module._ZipSource.listing

    def understated(self):
        files, dirs = real_listing(self)
        return [ingest_module._Entry(e.parts, e.display, e.ref, 0) for e in files], dirs

    monkeypatch.setattr(ingest_module._ZipSource, "listing", understated)
    before = store_hashes(store.root)
    with pytest.raises(IngestError, match=r"add up to 900,000 bytes \(counting 3 file"):
        store.ingest(src, max_total_bytes=800_000)
    assert store_hashes(store.root) == before


def test_a_file_changed_between_check_and_write_is_refused(store, tmp_path):
    # The write reads each file again: it must be the very bytes that were checked.
    src = make_tree(tmp_path / "second", generic_files(domains=("second",)))
    victim = src / "second" / "dog" / "img0.png"

    def swap_when_checked(done: int, total: int) -> None:
        if done == total:
            victim.write_bytes(image_bytes(4242))

    before = store_hashes(store.root)
    with pytest.raises(IngestError, match=r"second/dog/img0\.png in .* changed while"):
        store.ingest(src, progress=swap_when_checked)
    assert store_hashes(store.root) == before


# ----------------------------------------------------------------------------- symlinks


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_symlink_out_of_a_folder_source_is_refused(store, tmp_path, kind):
    src = make_tree(tmp_path / "src", generic_files())
    secret = make_tree(tmp_path / "outside", {"secret.png": image_bytes(999)})
    if kind == "file":
        link, target = src / "photos" / "cat" / "stolen.png", secret / "secret.png"
    else:
        link, target = src / "photos" / "stolen", secret
    os.symlink(target, link)
    before = store_hashes(store.root)
    result = cli("ingest", str(src), "--store", str(store.root))
    shown = str(link.relative_to(src))
    assert_one_line_error(
        result, shown, os.path.realpath(target), "outside the source", "remove the link"
    )
    assert store_hashes(store.root) == before


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "bad", ["new\nline", "esc\x1b[31mred", "bidi\u202eevil", "zero\u200bwidth", "nel\x85", "ls\u2028"]
)
@pytest.mark.parametrize("where", ["class", "domain"])
def test_control_characters_in_class_and_domain_names_are_refused(store, tmp_path, bad, where):
    files = generic_files(domains=("photos",), classes=("cat",))
    if where == "class":
        files = {k.replace("/cat/", f"/{bad}/"): v for k, v in files.items()}
    else:
        files = {k.replace("photos/", f"{bad}/"): v for k, v in files.items()}
    files.update(generic_files(domains=("sketches",)))  # a good domain beside it changes nothing
    src = make_zip(tmp_path / "src.zip", files)  # a zip carries any name but NUL
    before = store_hashes(store.root)
    result = cli("ingest", str(src), "--store", str(store.root))
    line = assert_one_line_error(result, repr(bad), f"{where} name must", "control or format")
    assert bad not in line  # shown escaped: the name cannot restyle or split the output
    assert store_hashes(store.root) == before


def test_control_characters_in_domain_option_are_refused(store, tmp_path):
    before = store_hashes(store.root)
    result = cli("ingest", str(tmp_path / "first"), "--store", str(store.root),
                 "--domain", "a\x1b]0;pwned\x07")
    assert_one_line_error(result, "'a\\x1b]0;pwned\\x07'", "control or format")
    assert store_hashes(store.root) == before


def test_control_characters_in_a_file_name_make_it_invalid(tmp_path):
    files = generic_files(domains=("photos",))
    files["photos/cat/evil\x1b[2J.png"] = image_bytes(500)
    src = make_zip(tmp_path / "src.zip", files)
    with pytest.raises(IngestError, match=r"evil\\x1b\[2J\.png: its name has control"):
        Store(tmp_path / "store").ingest(src)
    report = Store(tmp_path / "store").ingest(src, skip_invalid=True)
    assert report.num_images == 6 and report.skipped == 1
    (warning,) = report.warnings
    assert "evil\\x1b[2J.png" in warning and "\x1b" not in warning


# ----------------------------------------------------------------------------- warnings


def bad_entries_zip(path: Path, bad: int) -> Path:
    """One good class and `bad` undecodable files beside it."""
    files: dict[str, bytes | None] = {f"zoo/cat/good{i}.png": image_bytes(i) for i in range(3)}
    files.update({f"zoo/cat/bad{i:04d}.png": b"not a png" for i in range(bad)})
    return make_zip(path, files)


def test_skip_invalid_prints_each_warning_once_then_a_count(tmp_path):
    # A real process: a library that also logged each warning printed it twice (the logging
    # module's last-resort handler writes to stderr), which an in-process runner hides.
    src = bad_entries_zip(tmp_path / "bad.zip", 300)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ingest", str(src), "--store", str(tmp_path / "s"),
         "--skip-invalid"],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "ANOLE_PROGRESS"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 21, proc.stderr
    assert all(line.startswith("warning: skipped invalid file zoo/cat/bad0") for line in lines[:20])
    assert len(set(lines[:20])) == 20
    assert lines[20] == (
        "warning: ... and 280 more warning(s) (300 invalid file(s) skipped in all); "
        "the JSON report (--json) lists the first 300"
    )
    assert proc.stdout.split() == ["zoo", "new", "1", "classes", "3", "images"]


def test_report_keeps_a_bounded_list_and_counts_the_rest(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ingest_module, "MAX_REPORTED_WARNINGS", 50)
    src = bad_entries_zip(tmp_path / "bad.zip", 300)
    report = Store(tmp_path / "store").ingest(src, skip_invalid=True)
    assert (len(report.warnings), report.more_warnings, report.skipped) == (50, 250, 300)
    assert not [r for r in caplog.records if r.name.startswith("pipeline")]  # printed by callers
    lines = report.warning_lines()
    assert len(lines) == 21 and lines[-1].startswith("... and 280 more warning(s)")
    payload = json.loads(json.dumps(report.to_dict()))
    assert len(payload["warnings"]) == 50 and payload["more_warnings"] == 250


# ----------------------------------------------------------------------------- full disk


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["parquet", "registry"])
def test_full_disk_during_ingest_is_one_line_and_changes_nothing(store, tmp_path, monkeypatch,
                                                                  where):
    src = make_tree(tmp_path / "second", generic_files(domains=("second",)))
    if where == "parquet":
        monkeypatch.setattr(store_module.pq.ParquetWriter, "write_table", enospc)
        writing = "data/domain=second/version=1/part-"
    else:
        real_replace = os.replace

        def replace(src_path, dst_path):
            if Path(dst_path).name == "registry.json":
                enospc()
            real_replace(src_path, dst_path)

        monkeypatch.setattr(atomic.os, "replace", replace)
        writing = "registry.json"
    before = store_hashes(store.root)
    registry = store.registry_path.read_bytes()
    result = cli("ingest", str(src), "--store", str(store.root))
    assert_one_line_error(result, "no space left", writing, str(src), "nothing was lost")
    assert store.registry_path.read_bytes() == registry
    assert store_hashes(store.root) == before  # no part file, no temp file left behind
    with pytest.raises(DiskFullError):
        store.ingest(src)
    assert store_hashes(store.root) == before


def test_full_disk_while_caching_decoded_images_still_loads(store, monkeypatch):
    monkeypatch.setattr(atomic.os, "fsync", enospc)
    images = store.load_images(image_size=8)
    assert images.images.shape == (6, 1, 8, 8)
    assert not list((store.root / "cache").glob("*"))
