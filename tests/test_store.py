"""The store: real Omniglot counts, idempotency, versions, crash safety, locking, load_images."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

import pipeline.store as store_module
from pipeline.errors import StoreError
from pipeline.images import decode_image
from pipeline.store import DomainInfo, Store

ZIP1_DOMAINS = ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
ALL_DOMAINS = sorted([*ZIP1_DOMAINS, "Japanese_(katakana)", "Sanskrit", "Tagalog"])


def image_bytes(seed: int) -> bytes:
    img = Image.new("L", (8, 8), color=seed % 256)
    img.putpixel((0, 0), (seed * 7) % 256)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tiny_source(root: Path, *, domains=("a", "b"), seed: int = 0) -> Path:
    """A generic two-domain folder: 2 classes x 3 images per domain."""
    for d in domains:
        for c in ("c1", "c2"):
            (root / d / c).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                seed += 1
                (root / d / c / f"{i}.png").write_bytes(image_bytes(seed))
    return root


def snapshot(store: Store) -> dict[str, bytes]:
    """Every file in the store (except the lock) with its bytes."""
    return {
        str(p.relative_to(store.root)): p.read_bytes()
        for p in sorted(store.root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def omniglot_store(omniglot_zips, tmp_path_factory):
    """A store holding both Omniglot zips, and the two ingest reports."""
    store = Store(tmp_path_factory.mktemp("omniglot") / "store")
    first = store.ingest(omniglot_zips[0])
    second = store.ingest(omniglot_zips[1])
    return store, first, second


def copy_store(store: Store, dest: Path) -> Store:
    shutil.copytree(store.root, dest)
    return Store(dest)


# ----------------------------------------------------------------------------- real data


def test_both_zips_give_eight_domains(omniglot_store):
    store, first, second = omniglot_store
    assert [d.name for d in first.domains] == ZIP1_DOMAINS
    assert all(d.outcome == "new" for d in first.domains)
    assert {d.name: d.outcome for d in second.domains} == {
        "Greek": "unchanged",
        "Japanese_(katakana)": "new",
        "Latin": "unchanged",
        "Sanskrit": "new",
        "Tagalog": "new",
    }
    infos = store.domains()
    assert [i.name for i in infos] == ALL_DOMAINS
    assert sum(i.num_classes for i in infos) == 242
    assert sum(i.num_images for i in infos) == 4840
    assert {i.layout for i in infos} == {"omniglot"}
    assert all(i.version == 1 for i in infos)
    table = store.read_table()
    assert table.num_rows == 4840
    assert len(set(table.column("sample_id").to_pylist())) == 4840
    assert set(table.column("width").to_pylist()) == {105}
    greek = store.read_table(["Greek"])
    assert greek.num_rows == 480
    assert greek.column("source_path")[0].as_py().startswith("images_background_small1/Greek/")


def test_registry_records_versions(omniglot_store):
    store, _, _ = omniglot_store
    registry = json.loads(store.registry_path.read_text())
    entry = registry["domains"]["Korean"]
    assert entry["current"] == 1
    (v1,) = entry["versions"]
    assert v1["num_classes"] == 40 and v1["num_images"] == 800
    assert v1["source"].endswith("images_background_small1.zip")
    assert v1["layout"] == "omniglot"
    assert v1["ingested_at"].endswith("+00:00")
    assert (store.root / v1["path"]).is_file()
    info = store.domains()[0]
    assert isinstance(info, DomainInfo) and info.to_dict()["name"] == info.name


def test_reingest_changes_nothing(omniglot_store, omniglot_zips, tmp_path):
    store = copy_store(omniglot_store[0], tmp_path / "store")
    before = snapshot(store)
    version = store.data_version()
    for z in omniglot_zips:
        report = store.ingest(z)
        assert not report.changed
        assert {d.outcome for d in report.domains} == {"unchanged"}
    assert snapshot(store) == before
    assert store.data_version() == version


def test_changed_domain_becomes_new_version(omniglot_store, omniglot_zips, tmp_path):
    store = copy_store(omniglot_store[0], tmp_path / "store")
    old_version = store.data_version()
    # Drop one Greek character and change one Latin image.
    changed = tmp_path / "changed.zip"
    with zipfile.ZipFile(omniglot_zips[0]) as src, zipfile.ZipFile(changed, "w") as dst:
        for info in src.infolist():
            if "/Greek/character01/" in info.filename:
                continue
            data = src.read(info)
            if "/Latin/character01/" in info.filename and info.filename.endswith("_01.png"):
                with Image.open(io.BytesIO(data)) as img:
                    out = io.BytesIO()
                    ImageOps.mirror(img.convert("L")).save(out, format="PNG")
                    data = out.getvalue()
            dst.writestr(info, data)
    report = store.ingest(changed)
    outcomes = {d.name: (d.outcome, d.version) for d in report.domains}
    assert outcomes["Greek"] == ("new version", 2)
    assert outcomes["Latin"] == ("new version", 2)
    assert outcomes["Korean"] == ("unchanged", 1)

    history = store.history("Greek")
    assert [h.version for h in history] == [1, 2]
    assert [h.num_classes for h in history] == [24, 23]
    assert all((store.root / h.path).is_file() for h in history)
    assert store.read_version("Greek", 1).num_rows == 480
    assert store.read_table(["Greek"]).num_rows == 460
    assert store.read_table().num_rows == 4820
    assert store.data_version() != old_version
    assert store.data_version(["Korean"]) == omniglot_store[0].data_version(["Korean"])

    # Going back to the original content is another version, not a rewrite of history.
    back = store.ingest(omniglot_zips[0], domain="Greek")
    assert [(d.name, d.outcome, d.version) for d in back.domains] == [("Greek", "new version", 3)]
    assert store.history("Greek")[2].content_hash == history[0].content_hash
    with pytest.raises(StoreError, match="no version 7"):
        store.read_version("Greek", 7)


def test_domain_argument_holds_out_alphabets(omniglot_zips, tmp_path):
    store = Store(tmp_path / "store")
    report = store.ingest(omniglot_zips[1], domain="Tagalog")
    assert [(d.name, d.num_classes, d.num_images) for d in report.domains] == [("Tagalog", 17, 340)]
    assert [i.name for i in store.domains()] == ["Tagalog"]


def test_load_images_decodes_once_and_caches(omniglot_store, tmp_path, monkeypatch):
    store = copy_store(omniglot_store[0], tmp_path / "store")
    images = store.load_images()
    assert images.images.shape == (4840, 1, 28, 28) and images.images.dtype == np.uint8
    assert images.labels.dtype == np.int32 and images.class_domain.dtype == np.int32
    assert images.domains == ALL_DOMAINS
    assert images.class_names == sorted(images.class_names) and images.num_classes == 242
    assert np.array_equal(np.unique(images.labels), np.arange(242))
    assert np.all(np.diff(images.labels) >= 0)  # grouped by class
    for k, name in enumerate(images.class_names):
        assert name.split("/")[0] == images.domains[images.class_domain[k]]
    assert images.data_version == store.data_version()
    # Inverted: strokes are bright on a dark background.
    assert images.images.mean() < 60
    table = store.read_table([images.domains[0]])
    first = decode_image(table.column("image")[0].as_py(), image_size=28)
    assert np.array_equal(images.images[0], first)

    cache = store.cache_path(images.data_version, 28, 1, True)
    assert cache.is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is warm")

    monkeypatch.setattr(store_module, "decode_image", no_decoding)
    again = store.load_images()
    assert np.array_equal(again.images, images.images)
    assert np.array_equal(again.labels, images.labels)
    assert again.class_names == images.class_names and again.domains == images.domains
    monkeypatch.undo()

    rgb = store.load_images(["Greek", "Latin"], image_size=14, channels=3, invert=False)
    assert rgb.images.shape == (1000, 3, 14, 14)
    assert rgb.domains == ["Greek", "Latin"] and rgb.num_classes == 50
    assert rgb.images.mean() > 190  # not inverted: white paper
    assert store.cache_path(rgb.data_version, 14, 3, False).is_file()


# ----------------------------------------------------------------------------- failures


def test_registry_write_failure_leaves_store_as_before(tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    store.ingest(tiny_source(tmp_path / "v1"))
    before, table = snapshot(store), store.read_table()

    def boom(self, registry):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Store, "_write_registry", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        store.ingest(tiny_source(tmp_path / "v2", seed=100))
    assert snapshot(store) == before
    assert store.read_table().equals(table)


def test_parquet_write_failure_leaves_store_as_before(tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    store.ingest(tiny_source(tmp_path / "v1"))
    before, table = snapshot(store), store.read_table()
    calls = []
    real_write = store_module.pq.ParquetWriter.write_table

    def fail_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("I/O error")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(store_module.pq.ParquetWriter, "write_table", fail_second)
    with pytest.raises(OSError, match="I/O error"):
        store.ingest(tiny_source(tmp_path / "v2", seed=100))
    assert len(calls) == 2
    assert snapshot(store) == before
    assert store.read_table().equals(table)


KILL_SCRIPT = """
import os, signal, sys
import pipeline.store as m
from pipeline.store import Store

where = sys.argv[3]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if where == "registry":  # after the Parquet files are in place, before the commit
    m.Store._write_registry = die
else:  # halfway through writing a Parquet temp file
    real = m.pq.ParquetWriter.write_table
    def half(self, table, *args, **kw):
        real(self, table.slice(0, 1), *args, **kw)
        die()
    m.pq.ParquetWriter.write_table = half
Store(sys.argv[1]).ingest(sys.argv[2])
"""


@pytest.mark.parametrize("where", ["registry", "parquet"])
def test_sigkill_mid_ingest_leaves_store_readable(tmp_path, where):
    store = Store(tmp_path / "store")
    store.ingest(tiny_source(tmp_path / "v1"))
    registry, table = store.registry_path.read_bytes(), store.read_table()
    files_before = set(snapshot(store))
    v2 = tiny_source(tmp_path / "v2", seed=100)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(store.root), str(v2), where],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert store.registry_path.read_bytes() == registry
    assert store.read_table().equals(table)
    leftovers = set(snapshot(store)) - files_before
    assert leftovers, "the kill should have left a stray file behind"
    # The next ingest ignores and removes them, then commits normally.
    report = store.ingest(v2)
    assert {d.outcome for d in report.domains} == {"new version"}
    referenced = {h.path for name in ("a", "b") for h in store.history(name)}
    assert set(snapshot(store)) == referenced | {"registry.json"}
    assert store.read_table().num_rows == 12


def test_concurrent_ingest_waits_for_the_lock(tmp_path):
    store = Store(tmp_path / "store")
    src = tiny_source(tmp_path / "src")
    done = threading.Event()
    errors: list[BaseException] = []

    def other():
        try:
            Store(store.root).ingest(src)
        except BaseException as e:  # surface failures in the main thread
            errors.append(e)
        done.set()

    with store._locked():
        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.5)
        assert not done.is_set() and not store.registry_path.exists()
    thread.join(timeout=30)
    assert done.is_set() and not errors
    assert [i.name for i in store.domains()] == ["a", "b"]


def test_corrupt_registry_is_a_clear_error(tmp_path):
    store = Store(tmp_path / "store")
    store.root.mkdir()
    store.registry_path.write_text("{not json")
    with pytest.raises(StoreError, match=r"registry\.json is unreadable"):
        store.domains()


def test_tampered_parquet_is_detected(tmp_path):
    store = Store(tmp_path / "store")
    store.ingest(tiny_source(tmp_path / "src"))
    a, b = store.domains()
    pq.write_table(pq.read_table(store.root / b.path), store.root / a.path)
    with pytest.raises(StoreError, match="does not match the registry"):
        store.read_table(["a"])
    (store.root / a.path).unlink()
    with pytest.raises(StoreError, match=r"cannot read .*Re-ingest"):
        store.read_table()


def test_unknown_domain_and_empty_store(tmp_path):
    store = Store(tmp_path / "store")
    assert store.domains() == []
    assert store.read_table().num_rows == 0
    with pytest.raises(StoreError, match="no domains yet"):
        store.load_images()
    store.ingest(tiny_source(tmp_path / "src"))
    with pytest.raises(StoreError, match=r"unknown domain\(s\) 'zz'.*known: a, b"):
        store.read_table(["zz"])
    with pytest.raises(StoreError, match="unknown domain"):
        store.history("zz")
    assert store.data_version(["a"]) != store.data_version(["b"]) != store.data_version()


def test_store_root_defaults_to_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOLE_HOME", str(tmp_path / "home"))
    assert Store().root == tmp_path / "home"
