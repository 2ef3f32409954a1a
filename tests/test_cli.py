"""The `anole` CLI, run as subprocesses the way a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys


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
                              str(oneshot_runs[0]), "--views", "3", "--refine-steps", "0",
                              "--json").stdout)
    assert viewed["views"] == 3 and viewed["refine_steps"] == 0
    assert 0 <= viewed["oneshot"]["mean_error"] <= 1


def test_train_help_config_lists_fields():
    out = anole("train", "--help-config").stdout
    assert "inner_lr" in out and "Fast (inner-loop) learning rate" in out
