"""The `anole` CLI, run as subprocesses the way a user runs it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def anole(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"anole {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def test_help_imports_no_heavy_modules():
    # `anole --help` must answer at once: the CLI module may not import torch, ray, prefect or pyarrow.
    code = (
        "import sys, flows.cli; "
        "heavy = [m for m in ('torch', 'ray', 'prefect', 'pyarrow', 'numpy') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert "ingest" in anole("--help").stdout


def test_ingest_domains_and_idempotency(tmp_path, omniglot_zips):
    env = {"ANOLE_HOME": str(tmp_path / "store")}
    first = json.loads(anole("ingest", str(omniglot_zips[0]), "--json", env=env).stdout)
    assert first["changed"] and first["num_domains"] == 5
    again = json.loads(anole("ingest", str(omniglot_zips[0]), "--json", env=env).stdout)
    assert not again["changed"]
    anole("ingest", str(omniglot_zips[1]), env=env)
    listed = json.loads(anole("domains", "--json", env=env).stdout)
    assert len(listed) == 8
    assert sum(d["num_classes"] for d in listed) == 242
    assert sum(d["num_images"] for d in listed) == 4840


def test_bad_source_is_a_clean_error(tmp_path):
    proc = anole("ingest", str(tmp_path / "missing"), "--store", str(tmp_path / "s"), check=False)
    assert proc.returncode == 2
    assert "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_sample_writes_a_pool(tmp_path, omniglot_store):
    pool = tmp_path / "pool.parquet"
    out = json.loads(anole("sample", "--out", str(pool), "--episodes", "50", "--ways", "20",
                           "--store", str(omniglot_store.root), "--json").stdout)
    assert out["episodes"] == 50 and pool.exists()
    from pipeline.tasks import EpisodeSpecs

    assert EpisodeSpecs.read_pool(pool).indices.shape[:2] == (50, 20)


def test_evaluate_baseline_on_runs(oneshot_runs):
    out = json.loads(anole("evaluate", "--runs", str(oneshot_runs[0].parent), "--json").stdout)
    assert set(out["oneshot"]["runs"]) == {r.name for r in oneshot_runs}
    assert 0.2 < out["oneshot"]["mean_error"] < 0.6  # modified Hausdorff: 36% on runs 1-4


def test_train_then_evaluate_checkpoint(tmp_path, omniglot_store, oneshot_runs, tiny):
    run = tmp_path / "run"
    sets = [x for o in tiny for x in ("--set", o)]
    trained = json.loads(anole("train", "--learner", "protonet", "--steps", "4", "--out", str(run),
                               "--store", str(omniglot_store.root), "--json", *sets).stdout)
    assert trained["step"] == 4
    scored = json.loads(anole("evaluate", "--checkpoint", trained["best_checkpoint"], "--runs",
                              str(oneshot_runs[0]), "--ways", "5", "--episodes", "20",
                              "--store", str(omniglot_store.root), "--json").stdout)
    assert 0 <= scored["oneshot"]["mean_error"] <= 1
    assert scored["heldout"]["ways"] == 5 and scored["heldout"]["episodes"] == 20
    assert scored["views"] == 1  # tiny's eval_views
    assert scored["refine_steps"] == 3  # ProtoNets' default
    viewed = json.loads(anole("evaluate", "--checkpoint", trained["best_checkpoint"], "--runs",
                              str(oneshot_runs[0]), "--views", "3", "--refine-steps", "0", "--device", "cpu",
                              "--json").stdout)
    assert viewed["views"] == 3 and viewed["refine_steps"] == 0
    assert 0 <= viewed["oneshot"]["mean_error"] <= 1


def test_train_help_config_lists_fields():
    out = anole("train", "--help-config").stdout
    assert "learner.inner_lr" in out and "Fast (inner-loop) SGD learning rate" in out
    # every field's range, from the same rule the config checks
    assert "Fast (inner-loop) SGD learning rate, alpha.\n    range: a finite number > 0" in out
    fields = [line for line in out.splitlines() if " = " in line and not line.startswith(" ")]
    assert len(fields) > 40 and out.count("\n    range: ") == len(fields)


def _tree(root: Path) -> dict[str, str]:
    """Every path under `root` with a hash of its content: to show that nothing changed."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


# Bad arguments: (command line, what its one error line says). Each is refused before any work.
BAD_ARGS = [
    (["run", "--minutes", "-1"], "--minutes -1: must be a finite number > 0"),
    (["run", "--minutes", "nan"], "--minutes nan: must be a finite number > 0"),
    (["run", "--minutes", "0"], "--minutes 0: must be a finite number > 0"),
    (["run", "--workers", "-1"], "--workers -1: must be an integer >= 0"),
    (["run", "--out", "notes.txt"], "--out notes.txt is a file: give a folder"),
    (["run", "--learner", "svm[/x]"], "--learner 'svm[/x]': must be protonet, reptile, maml, fomaml, metaopt-ridge or metaopt-svm"),
    (["evaluate", "--checkpoint", "c.pt", "--ways", "5", "--episodes", "0"],
     "--episodes 0: must be an integer >= 1"),
    (["evaluate", "--checkpoint", "c.pt", "--ways", "5", "--queries", "0"],
     "--queries 0: must be an integer >= 1"),
    (["evaluate", "--checkpoint", "c.pt", "--ways", "5", "--shots", "0"],
     "--shots 0: must be an integer >= 1"),
    (["evaluate", "--checkpoint", "c.pt", "--ways", "1"], "--ways 1: must be an integer >= 2"),
    (["evaluate", "--checkpoint", "c.pt", "--ways", "-5"], "--ways -5: must be an integer >= 2"),
    (["evaluate", "--runs", "r", "--views", "0"], "--views 0: must be an integer >= 1"),
    (["evaluate", "--runs", "r", "--bn-mode", "batch"], "--bn-mode 'batch': must be transductive"),
    (["sample", "--out", "p.parquet", "--ways", "1"], "--ways 1: must be an integer >= 2"),
    (["sample", "--out", "p.parquet", "--shots", "0"], "--shots 0: must be an integer >= 1"),
    (["sample", "--out", "p.parquet", "--queries", "0"], "--queries 0: must be an integer >= 1"),
    (["sample", "--out", "p.parquet", "--episodes", "0"], "--episodes 0: must be an integer >= 1"),
    (["sample", "--out", "p.parquet", "--seed", "-1"], "--seed -1: must be an integer >= 0"),
    (["serve", "--port", "70000"], "--port 70000: must be an integer >= 1 and <= 65535"),
    (["serve", "--debounce", "-1"], "--debounce -1: must be a finite number >= 0"),
    (["train", "--set", "meta_lr=nan"], "config field 'meta_lr' = nan: must be a finite number > 0"),
    (["train", "--set", "hidden=0"], "config field 'hidden' = 0: must be an integer >= 1"),
    (["train", "--workers", "-1"], "--workers -1: must be an integer >= 0"),
    (["train", "--steps", "0"], "--steps 0: must be an integer >= 1"),
    # what click cannot parse is one line too
    (["evaluate", "--episodes", "abc"], "Invalid value for '--episodes'"),
    (["run", "--bogus"], "No such option: --bogus"),
    (["sample"], "Missing option '--out'"),
    # names holding rich markup print as typed, not as a MarkupError traceback
    (["train", "--config", "c[/x].yaml"], "config file c[/x].yaml does not exist"),
    (["ingest", "src[/x]"], "src[/x]"),
    (["ingest", "src", "--domain", "d[/x]"], "domain='d[/x]'"),
]


@pytest.mark.parametrize("args, message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_argument_is_one_line_and_changes_nothing(tmp_path, args, message):
    (tmp_path / "src").mkdir()  # an existing, empty source folder for the ingest cases
    (tmp_path / "notes.txt").write_text("not a workspace\n")
    before = _tree(tmp_path)
    env = {"ANOLE_HOME": str(tmp_path / "store"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "COLUMNS": "40"}  # a narrow terminal must not wrap the line either
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    # no workspace, store, pool or Prefect home was made
    assert _tree(tmp_path) == before


def test_names_with_markup_print_as_typed(tmp_path):
    # A warning and the progress bar show source and class names verbatim: rich would read
    # "[red]" as a style and drop it from the line.
    from PIL import Image

    for cls in ("c1", "c[red]2"):
        (tmp_path / "src[red]" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (28, 28), 60 * i + (cls == "c1") * 20).save(tmp_path / "src[red]" / cls / f"{i}.png")
    (tmp_path / "src[red]" / "c[red]2" / "bad.png").write_bytes(b"not an image")
    proc = anole("ingest", str(tmp_path / "src[red]"), "--domain", "d", "--skip-invalid",
                 "--store", str(tmp_path / "store"), env={"ANOLE_PROGRESS": "1"})
    assert "ingest src[red]" in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert any("c[red]2/bad.png" in line for line in warnings), proc.stderr
