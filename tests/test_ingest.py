"""Ingestion: layouts, bad input and reports, on tiny synthetic folders and zips.

The real Omniglot zips (counts, idempotency, versions, crashes) are in tests/test_store.py.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.errors import IngestError, LayoutError
from pipeline.ingest import SCHEMA, scan_source
from pipeline.store import Store


def image_bytes(seed: int, fmt: str = "PNG", size: int = 8) -> bytes:
    """A tiny image whose content (and so sha256) is unique per seed."""
    img = Image.new("L", (size, size), color=seed % 256)
    img.putpixel((0, 0), (seed * 7) % 256)
    img.putpixel((1, 0), (seed // 256) % 256)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_tree(root: Path, files: dict[str, bytes | None]) -> Path:
    """Create `files` under root; a None value makes an (empty) folder."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


def make_zip(path: Path, files: dict[str, bytes | None]) -> Path:
    """A zip with `files` as entries; a None value makes a folder entry."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            if data is None:
                zf.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
            else:
                zf.writestr(name, data)
    return path


def generic_files(domains=("photos", "sketches"), classes=("cat", "dog"), per_class=3) -> dict:
    files: dict[str, bytes | None] = {}
    seed = 0
    exts = ["png", "jpg", "jpeg"]
    for d in domains:
        for c in classes:
            for i in range(per_class):
                seed += 1
                ext = exts[i % 3]
                fmt = "PNG" if ext == "png" else "JPEG"
                files[f"{d}/{c}/img{i}.{ext}"] = image_bytes(seed, fmt)
    return files


def store_files(store: Store) -> set[str]:
    """Every file under the store except the lock (to prove nothing was written)."""
    if not store.root.exists():
        return set()
    return {
        str(p.relative_to(store.root))
        for p in store.root.rglob("*")
        if p.is_file() and p.name != ".lock"
    }


# ----------------------------------------------------------------------------- layouts


def test_generic_multi_domain_folder(tmp_path):
    src = make_tree(tmp_path / "src", generic_files())
    store = Store(tmp_path / "store")
    report = store.ingest(src)
    assert report.layout == "generic"
    assert [(d.name, d.outcome, d.num_classes, d.num_images) for d in report.domains] == [
        ("photos", "new", 2, 6),
        ("sketches", "new", 2, 6),
    ]
    table = store.read_table()
    assert table.schema.equals(SCHEMA)
    assert table.num_rows == 12
    assert set(table.column("width").to_pylist()) == {8}
    assert "photos/cat/img0.png" in table.column("source_path").to_pylist()
    # Partitioned by domain and version, named by content hash.
    for info in store.domains():
        assert info.path.startswith(f"data/domain={info.name}/version=1/part-")
        assert info.path.endswith(f"{info.content_hash[:16]}.parquet")
        assert pq.read_table(store.root / info.path).num_rows == info.num_images


def test_wrapper_folder_in_zip_is_descended(tmp_path):
    files = {f"wrap/{k}": v for k, v in generic_files().items()}
    files["wrap/"] = None
    src = make_zip(tmp_path / "data.zip", files)
    report = Store(tmp_path / "store").ingest(src)
    assert [d.name for d in report.domains] == ["photos", "sketches"]
    assert report.warnings == ()


def test_single_domain_named_by_folder_or_domain_argument(tmp_path):
    files = {k.split("/", 1)[1]: v for k, v in generic_files(domains=("x",)).items()}
    src = make_tree(tmp_path / "my_domain", files)
    store = Store(tmp_path / "store")
    assert [d.name for d in store.ingest(src).domains] == ["my_domain"]
    assert [d.name for d in store.ingest(src, domain="renamed").domains] == ["renamed"]
    assert [d.name for d in store.domains()] == ["my_domain", "renamed"]


def test_single_domain_zip_named_by_stem_and_wrapper(tmp_path):
    files = {k.split("/", 1)[1]: v for k, v in generic_files(domains=("x",)).items()}
    flat = make_zip(tmp_path / "birds.zip", files)
    assert [d.name for d in scan_source(flat).domains] == ["birds"]
    # A lone top folder is a domain, or a wrapper named by domain=.
    wrapped = make_zip(tmp_path / "w.zip", {f"fish/{k}": v for k, v in files.items()})
    assert [d.name for d in scan_source(wrapped).domains] == ["fish"]
    assert [d.name for d in scan_source(wrapped, domain="trout").domains] == ["trout"]


def test_omniglot_layout_detected(tmp_path):
    files = {
        f"wrapper/{alpha}/character{c:02d}/{alpha}_{c}_{i}.png": image_bytes(
            100 * c + i + len(alpha)
        )
        for alpha in ("Greek", "Latin")
        for c in (1, 2)
        for i in range(2)
    }
    report = Store(tmp_path / "store").ingest(make_zip(tmp_path / "o.zip", files))
    assert report.layout == "omniglot"
    assert Store(tmp_path / "store").domains()[0].layout == "omniglot"


def test_domain_argument_selects_from_multi_domain_source(tmp_path):
    src = make_tree(tmp_path / "src", generic_files())
    store = Store(tmp_path / "store")
    report = store.ingest(src, domain="sketches")
    assert [d.name for d in report.domains] == ["sketches"]
    assert [d.name for d in store.domains()] == ["sketches"]
    with pytest.raises(IngestError, match=r"'paintings' is not in .*photos, sketches"):
        store.ingest(src, domain="paintings")


def test_junk_files_ignored_and_stray_files_warned(tmp_path):
    files = generic_files()
    files[".DS_Store"] = b"junk"
    files["__MACOSX/photos/cat/._img0.png"] = b"junk"
    files["photos/cat/.hidden.png"] = b"junk"
    files["README.md"] = b"# dataset"
    report = Store(tmp_path / "store").ingest(make_zip(tmp_path / "d.zip", files))
    assert report.num_images == 12
    assert len(report.warnings) == 1
    assert "README.md" in report.warnings[0]


# ----------------------------------------------------------------------------- bad input


def test_missing_source(tmp_path):
    with pytest.raises(IngestError, match=r"does not exist.*folder or \.zip"):
        Store(tmp_path / "store").ingest(tmp_path / "nope")


def test_source_that_is_not_a_zip(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(IngestError, match="neither a folder nor a .zip"):
        Store(tmp_path / "store").ingest(tmp_path / "notes.txt")


@pytest.mark.parametrize("content", [b"this is not a png", b"", "truncated"])
def test_corrupt_image_names_file_and_writes_nothing(tmp_path, content):
    files = generic_files()
    if content == "truncated":
        content = image_bytes(999, size=64)[:-40]
    files["photos/dog/broken.png"] = content
    src = make_tree(tmp_path / "src", files)
    store = Store(tmp_path / "store")
    with pytest.raises(IngestError, match=r"photos/dog/broken\.png") as err:
        store.ingest(src)
    assert "skip_invalid" in str(err.value)
    assert store_files(store) == set()
    # With skip_invalid the file is skipped, warned about by name, and counted.
    report = store.ingest(src, skip_invalid=True)
    assert report.skipped == 1
    assert any("photos/dog/broken.png" in w for w in report.warnings)
    assert report.num_images == 12


def test_non_image_file_in_class_folder(tmp_path):
    files = generic_files()
    files["sketches/cat/labels.txt"] = b"cat"
    src = make_zip(tmp_path / "d.zip", files)
    with pytest.raises(IngestError, match=r"sketches/cat/labels\.txt: not a \.png"):
        scan_source(src)
    assert scan_source(src, skip_invalid=True).domains[1].skipped == 1


def test_many_invalid_files_listed_compactly(tmp_path):
    files = generic_files()
    for i in range(30):
        files[f"photos/cat/bad{i:02d}.png"] = b"x"
    with pytest.raises(IngestError, match=r"30 invalid file\(s\).*\(and 27 more\)") as err:
        scan_source(make_tree(tmp_path / "src", files))
    assert "\n" not in str(err.value)  # the CLI prints it as one line


def test_empty_class_folder_warned_and_skipped(tmp_path):
    files = generic_files()
    files["photos/empty_class"] = None
    for make, name in ((make_tree, "src"), (make_zip, "src.zip")):
        report = Store(tmp_path / f"store-{name}").ingest(make(tmp_path / name, files))
        assert report.domains[0].num_classes == 2
        (warning,) = report.warnings
        assert "photos/empty_class/" in warning and "empty class folder" in warning


def test_empty_domain_folder_warned(tmp_path):
    files = generic_files()
    files["paintings/still_life"] = None
    report = scan_source(make_tree(tmp_path / "src", files))
    assert [d.name for d in report.domains] == ["photos", "sketches"]
    (warning,) = report.warnings
    assert "paintings/" in warning and "no images" in warning


def test_domain_left_empty_by_skipped_files(tmp_path):
    files = generic_files()
    files["paintings/still_life/x.png"] = b"not an image"
    report = scan_source(make_tree(tmp_path / "src", files), skip_invalid=True)
    assert [d.name for d in report.domains] == ["photos", "sketches"]
    assert any("'paintings'" in w and "none of its images" in w for w in report.warnings)
    with pytest.raises(IngestError, match="no valid images left"):
        scan_source(make_tree(tmp_path / "bad", {"d/c/x.png": b"junk"}), skip_invalid=True)


def test_class_left_empty_by_skipped_files(tmp_path):
    files = generic_files()
    files["photos/bad/x.png"] = b"nope"
    report = scan_source(make_tree(tmp_path / "src", files), skip_invalid=True)
    assert report.domains[0].num_classes == 2
    assert any("photos/bad/" in w and "no valid images" in w for w in report.warnings)


def test_class_below_min_images_is_warned_and_kept(tmp_path):
    files = generic_files()
    files["photos/rare/only.png"] = image_bytes(4242)
    report = Store(tmp_path / "store").ingest(make_tree(tmp_path / "src", files), min_images=2)
    assert report.domains[0].num_classes == 3
    (warning,) = report.warnings
    assert "photos/rare" in warning and "minimum of 2" in warning
    with pytest.raises(IngestError, match="min_images"):
        scan_source(tmp_path / "src", min_images=0)


@pytest.mark.parametrize(
    "evil", ["../evil.png", "/etc/evil.png", "photos/../../evil.png", "C:/x.png"]
)
def test_zip_entry_escaping_target_is_refused(tmp_path, evil):
    files = generic_files()
    files[evil] = image_bytes(77)
    src = make_zip(tmp_path / "evil.zip", files)
    store = Store(tmp_path / "store")
    with pytest.raises(IngestError, match="points outside the archive") as err:
        store.ingest(src, skip_invalid=True)
    assert repr(evil) in str(err.value)
    assert store_files(store) == set()


def test_symlink_loop_is_warned_not_followed(tmp_path):
    src = make_tree(tmp_path / "src", generic_files())
    os.symlink(src, src / "photos" / "cat" / "loop")  # points at an ancestor
    os.symlink("self", src / "sketches" / "self")  # resolves to itself: ELOOP
    report = Store(tmp_path / "store").ingest(src)
    assert report.num_images == 12
    assert any("photos/cat/loop" in w and "symlink loop" in w for w in report.warnings)
    assert any("sketches/self" in w and "symlink" in w for w in report.warnings)


def test_symlinks_inside_the_source_are_followed(tmp_path):
    src = make_tree(tmp_path / "src", generic_files())
    os.symlink(src / "sketches" / "cat", src / "photos" / "linked")  # a class folder
    os.symlink("../../sketches/dog/img0.png", src / "photos" / "dog" / "alias.png")  # a file
    photos = scan_source(src).domains[0]
    assert (photos.name, photos.num_classes, photos.num_images) == ("photos", 3, 10)


def test_mixed_depths_is_a_layout_error(tmp_path):
    files = generic_files()
    files["photos/stray.png"] = image_bytes(321)
    with pytest.raises(LayoutError, match=r"mixed depths.*photos/stray\.png") as err:
        scan_source(make_tree(tmp_path / "src", files))
    assert "multi-domain" in str(err.value) and "single-domain" in str(err.value)


def test_no_images_is_a_layout_error(tmp_path):
    src = make_tree(tmp_path / "src", {"a/b/readme.txt": b"hi", "a/c": None})
    with pytest.raises(LayoutError, match="no .png/.jpg/.jpeg images") as err:
        Store(tmp_path / "store").ingest(src)
    assert "<domain>/<class>/<image>" in str(err.value) and "<class>/<image>" in str(err.value)


def test_images_at_root_is_a_layout_error(tmp_path):
    src = make_tree(tmp_path / "flat", {"a.png": image_bytes(1), "b.png": image_bytes(2)})
    with pytest.raises(LayoutError, match="not in class folders"):
        scan_source(src)


def test_too_deep_without_single_wrapper_is_a_layout_error(tmp_path):
    files = {"a/d/c/x.png": image_bytes(1), "b/d/c/y.png": image_bytes(2)}
    with pytest.raises(LayoutError, match="3 folders deep"):
        scan_source(make_tree(tmp_path / "src", files))


@pytest.mark.parametrize("bad", ["a/b", "a=b", "", ".hidden", "..", "tab\there"])
def test_invalid_domain_argument(tmp_path, bad):
    files = {k.split("/", 1)[1]: v for k, v in generic_files(domains=("x",)).items()}
    src = make_tree(tmp_path / "src", files)
    with pytest.raises(IngestError, match="cannot name a store partition"):
        Store(tmp_path / "store").ingest(src, domain=bad)


def test_invalid_domain_folder_name(tmp_path):
    files = generic_files(domains=("ok", "key=value"))
    store = Store(tmp_path / "store")
    with pytest.raises(IngestError, match=r"'key=value'.*Rename it"):
        store.ingest(make_tree(tmp_path / "src", files))
    assert store_files(store) == set()


# ----------------------------------------------------------------------------- content


def test_duplicates_stored_once_and_counted(tmp_path):
    files = generic_files()
    files["photos/cat/copy.png"] = files["photos/cat/img0.png"]
    files["photos/dog/mislabelled.png"] = files["photos/cat/img0.png"]
    report = Store(tmp_path / "store").ingest(make_tree(tmp_path / "src", files))
    photos = report.domains[0]
    assert (photos.num_images, photos.duplicates) == (6, 2)
    (warning,) = report.warnings  # only the cross-class copy is suspicious
    assert "photos/dog/mislabelled.png" in warning and "photos/cat/" in warning


def test_identity_ignores_file_names_and_order(tmp_path):
    files = generic_files()
    renamed = {
        f"{k.rsplit('/', 1)[0]}/z{i}.{k.rsplit('.', 1)[1]}": v
        for i, (k, v) in enumerate(reversed(files.items()))
    }
    a = scan_source(make_tree(tmp_path / "a", files))
    b = scan_source(make_zip(tmp_path / "b.zip", renamed))
    for da, db in zip(a.domains, b.domains, strict=True):
        assert da.content_hash == db.content_hash
        assert sorted(da.table.column("sample_id").to_pylist()) == sorted(
            db.table.column("sample_id").to_pylist()
        )
    ids = a.domains[0].table.column("sample_id").to_pylist()
    assert len(set(ids)) == len(ids)


def test_progress_callback(tmp_path):
    calls: list[tuple[int, int]] = []
    Store(tmp_path / "store").ingest(
        make_tree(tmp_path / "src", generic_files()), progress=lambda d, t: calls.append((d, t))
    )
    assert calls[0] == (0, 12) and calls[-1] == (12, 12)
    assert [d for d, _ in calls] == list(range(13))


def test_report_to_dict_is_json(tmp_path):
    report = Store(tmp_path / "store").ingest(make_tree(tmp_path / "src", generic_files()))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["num_images"] == 12 and d["changed"] is True
    assert d["domains"][0]["outcome"] == "new"
    assert report.outcome("photos") == "new"
