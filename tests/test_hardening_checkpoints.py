"""Checkpoints under attack and accident (issue 13): crafted pickles, torn pairs and lines, two runs
in one folder, Ctrl-C, a full disk. Each bad input is one line on stderr, exit 2, nothing changed."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from typer.testing import CliRunner

from flows.cli import app
from pipeline import atomic
from pipeline.checkpoint import CheckpointDir, load_checkpoint
from pipeline.config import config_for
from pipeline.errors import CheckpointError, DiskFullError
from pipeline.scoring import load_model
from pipeline.train import Trainer, read_history, stop_on_signals

STEPS = 6  # the base run: checkpoints at 3 and 6 (tiny's checkpoint_every=3)


def _cfg(steps: int = STEPS):
    return config_for("protonet", overrides=TINY, steps=steps)


@pytest.fixture(scope="module")
def images(omniglot_store):
    cfg = _cfg()
    return omniglot_store.load_images(None, image_size=cfg.image_size, channels=cfg.channels,
                                      invert=cfg.invert)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, images) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    Trainer(_cfg(), images, out, log_tensorboard=False).run()
    return out


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A private copy of the base run (checkpoints 3 and 6, best, metrics)."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _anole(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_line_error(result, *needles: str) -> str:
    """The CLI's refusal: exit 2 and a single `error: ...` line naming each of `needles`."""
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _plant(payload_path: Path, payload: bytes, like: Path) -> None:
    """Write `payload` with a manifest copied from checkpoint `like`, its sha256 made to match."""
    manifest = json.loads(like.with_suffix(".json").read_text())
    manifest.update(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload),
                    file=payload_path.name)
    payload_path.write_bytes(payload)
    payload_path.with_suffix(".json").write_text(json.dumps(manifest))


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --- 1. a crafted pickle never runs --------------------------------------------------------------


def test_crafted_pickle_is_refused_by_evaluate_and_resume(run, tmp_path, images):
    marker = tmp_path / "ran"
    ckpts = run / "checkpoints"
    evil = _torch_bytes({"meta": _RunsCode(marker), "best_val": 0.9})
    # An older run's layout: best.pt beside a best.json whose sha256 matches it.
    (ckpts / "best.json").unlink()
    _plant(ckpts / "best.pt", evil, ckpts / "step-00000006.pt")
    _plant(ckpts / "step-00000006.pt", evil, ckpts / "step-00000006.pt")
    before = _hashes(run)
    for target in (ckpts / "best.pt", run):
        _one_line_error(_anole("evaluate", "--checkpoint", str(target), "--ways", "5"),
                        "convert-checkpoint", "could run code")
    with pytest.raises(CheckpointError, match="anole convert-checkpoint .*step-00000006.pt"):
        Trainer(_cfg(9), images, run, log_tensorboard=False).run(resume=True)
    assert not marker.exists()
    assert _hashes(run) == before


def test_convert_checkpoint_resaves_a_trusted_old_payload(run):
    # What an older anole could have written: numpy values where tensors and floats are now.
    ckpt = load_checkpoint(run / "checkpoints" / "step-00000003.pt")
    old = {**ckpt.state, "best_val": np.float64(0.5), "extra": np.arange(3)}
    path = run / "checkpoints" / "step-00000003.pt"
    _plant(path, _torch_bytes(old), path)
    with pytest.raises(CheckpointError, match="convert-checkpoint"):
        load_checkpoint(path)
    result = _anole("convert-checkpoint", str(run))
    assert result.exit_code == 0 and f"converted {path}" in result.stdout, result.output
    state = load_checkpoint(path).state
    assert state["best_val"] == 0.5 and type(state["best_val"]) is float
    assert torch.equal(state["extra"], torch.arange(3))
    assert "already in the safe form" in _anole("convert-checkpoint", str(path)).stdout


# --- 2. best pair: consistent by construction, and a fallback for older runs ---------------------


def _state(seed: int) -> dict:
    return {"meta": {"w": torch.randn(4, generator=torch.Generator().manual_seed(seed))}}


@pytest.mark.parametrize("crash_at", ["best-payload", "best-manifest", "best-pointer"])
def test_a_crash_while_saving_the_best_leaves_the_previous_best_whole(tmp_path, monkeypatch, crash_at):
    ckpts = CheckpointDir(tmp_path, keep_last=3)
    ckpts.save(10, _state(10), {}, best=True)
    real = atomic.atomic_write

    def crashing(path, write):
        name = Path(path).name
        hit = {"best-payload": name.startswith("best-") and name.endswith(".pt"),
               "best-manifest": name.startswith("best-") and name.endswith(".json"),
               "best-pointer": name == "best.json"}[crash_at]
        if hit:
            raise KeyboardInterrupt("the process dies here")
        real(path, write)

    monkeypatch.setattr(atomic, "atomic_write", crashing)
    with pytest.raises(KeyboardInterrupt):
        ckpts.save(20, _state(20), {}, best=True)
    monkeypatch.undo()
    best = ckpts.best()
    assert best.step == 10 and torch.equal(best.state["meta"]["w"], _state(10)["meta"]["w"])
    assert ckpts.latest().step == 20  # the step pair was whole before the best was touched
    ckpts.save(30, _state(30), {}, best=True)  # the next save clears what the crash left
    assert sorted(p.name for p in tmp_path.glob("best*")) == [
        "best-00000030-" + ckpts.best().manifest["sha256"][:12] + ext for ext in (".json", ".pt")
    ] + ["best.json"]


def test_an_older_runs_mismatched_best_pair_falls_back_to_the_newest_step(run):
    # best.pt and best.json from two different saves: the old layout's crash between renames.
    ckpts = run / "checkpoints"
    (ckpts / "best.json").unlink()
    for p in ckpts.glob("best-*"):
        p.unlink()
    shutil.copy(ckpts / "step-00000006.pt", ckpts / "best.pt")
    shutil.copy(ckpts / "step-00000003.json", ckpts / "best.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(run)
    assert model.step == 6
    assert [str(w.message).split(":")[0] for w in caught] == [
        f"checkpoint {ckpts / 'best.pt'} is corrupt",
        f"falling back to the newest intact step checkpoint {ckpts / 'step-00000006.pt'}",
    ]


# --- 3. metrics.jsonl -----------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in read_history(tmp_path, upto=3)] == [1, 3]
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match="metrics.jsonl line 2"):
        read_history(tmp_path, upto=3)


# --- 4. two runs in one folder ----------------------------------------------------------------


def test_a_second_run_into_one_out_is_refused_unless_resume_or_overwrite(run, omniglot_store, images):
    before = _hashes(run)
    with pytest.raises(CheckpointError, match="--resume .*--out .*--overwrite"):
        Trainer(_cfg(), images, run, log_tensorboard=False).run()
    common = ["train", "--out", str(run), "--store", str(omniglot_store.root), "--steps", "2",
              *(x for o in TINY for x in ("--set", o))]
    _one_line_error(_anole(*common), str(run), "--resume", "--overwrite")
    _one_line_error(_anole(*common, "--resume", "--overwrite"), "--resume", "--overwrite")
    assert _hashes(run) == before
    result = _anole(*common, "--overwrite", "--json")
    assert result.exit_code == 0, result.output
    assert CheckpointDir(run / "checkpoints").steps() == [2]
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").open())] == [0, 1, 2]


# --- 5. Ctrl-C and SIGTERM ------------------------------------------------------------------


def test_sigterm_stops_after_the_step_in_flight_and_checkpoints_it(tmp_path, images):
    previous = signal.getsignal(signal.SIGINT)
    # raise_signal runs the handler before it returns, as a real signal would within a bytecode.
    trainer = Trainer(_cfg(100), images, tmp_path, log_tensorboard=False,
                      progress=lambda step, total, m: step == 4 and signal.raise_signal(signal.SIGTERM))
    with stop_on_signals(trainer):
        result = trainer.run()
    assert (result.interrupted, result.step) == ("SIGTERM", 4)
    assert CheckpointDir(tmp_path / "checkpoints").steps() == [3, 4]
    assert signal.getsignal(signal.SIGINT) is previous

    def twice(step, total, m):
        if step == 5:
            signal.raise_signal(signal.SIGINT)
            assert trainer.stop_requested
            signal.raise_signal(signal.SIGINT)

    trainer = Trainer(_cfg(100), images, tmp_path, log_tensorboard=False, progress=twice)
    with pytest.raises(KeyboardInterrupt), stop_on_signals(trainer):
        trainer.run(resume=True)
    assert CheckpointDir(tmp_path / "checkpoints").steps() == [3, 4]
    assert signal.getsignal(signal.SIGINT) is previous


def _interrupt_anole_train(run: Path, args: list[str]) -> tuple[dict, str]:
    """Start `anole train ARGS` for ever, send SIGINT once step 1 is logged; its JSON result and
    stderr, after checking what every interrupted run must show."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args, "--steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
    while proc.poll() is None and time.monotonic() < deadline and (
            not metrics.exists() or '"step": 1,' not in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # training, after step 1
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    result = json.loads(out)
    stopped = result["step"]
    assert stopped >= 1 and CheckpointDir(run / "checkpoints").steps() == [stopped]
    assert f"SIGINT: stopped at step {stopped}" in err and "--resume --out" in err
    return result, err


def _ctrl_c_args(run: Path, store: Path) -> list[str]:
    # No periodic checkpoint or validation: any checkpoint is the one Ctrl-C wrote.
    return ["train", "--out", str(run), "--store", str(store), "--json",
            *(x for o in TINY for x in ("--set", o)), "--set", "checkpoint_every=100000",
            "--set", "val_every=100000"]


def test_ctrl_c_during_anole_train_checkpoints_and_resume_continues(tmp_path, omniglot_store):
    run = tmp_path / "run"
    args = _ctrl_c_args(run, omniglot_store.root)
    stopped = _interrupt_anole_train(run, args)[0]["step"]
    # A crash mid-append would have left a torn line: resume drops it with a warning.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99')
    resumed = _anole(*args, "--steps", str(stopped + 2), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stderr.startswith(f"warning: {run / 'metrics.jsonl'}: dropped a torn last line")
    assert json.loads(resumed.stdout)["step"] == stopped + 2
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").open())]
    assert steps == sorted(steps) and steps[-1] == stopped + 2


def test_ctrl_c_during_distributed_anole_train_checkpoints_every_applied_step(tmp_path,
                                                                             omniglot_store):
    run = tmp_path / "run"
    args = [*_ctrl_c_args(run, omniglot_store.root), "--workers", "2"]
    result, err = _interrupt_anole_train(run, args)
    assert "--workers 2 --resume" in err
    # The parameter server applied each step once, and the checkpoint holds the last of them.
    assert result["counters"]["applied"] == result["step"]
    assert result["counters"]["duplicates"] == 0


# --- 6. evaluate: every broken checkpoint is one clear line ---------------------------------------


def _no_config(ckpts: Path) -> Path:
    manifest = json.loads((ckpts / "step-00000006.json").read_text())
    del manifest["config"]
    (ckpts / "step-00000006.json").write_text(json.dumps(manifest))
    return ckpts / "step-00000006.pt"


def _no_split(ckpts: Path) -> Path:
    manifest = json.loads((ckpts / "step-00000006.json").read_text())
    del manifest["split"]
    (ckpts / "step-00000006.json").write_text(json.dumps(manifest))
    return ckpts / "step-00000006.pt"


def _random_payload(ckpts: Path) -> Path:
    path = ckpts / "step-00000006.pt"
    _plant(path, random.Random(0).randbytes(4096), path)
    return path


@pytest.mark.parametrize("damage, needles", [
    (_random_payload, ["step-00000006.pt", "not a torch checkpoint"]),
    (_no_config, ["step-00000006.json", "'config'"]),
    (_no_split, ["step-00000006.json", "'split'"]),
])
def test_evaluate_refuses_a_broken_checkpoint_in_one_line(run, damage, needles):
    target = damage(run / "checkpoints")
    before = _hashes(run)
    _one_line_error(_anole("evaluate", "--checkpoint", str(target), "--ways", "5"), *needles)
    assert _hashes(run) == before


def test_evaluate_names_a_folder_without_checkpoints(tmp_path):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    for folder in (tmp_path / "empty", tmp_path / "empty" / "checkpoints"):
        err = _one_line_error(_anole("evaluate", "--checkpoint", str(folder), "--ways", "5"),
                              f"{folder} holds no checkpoint", "anole train --out")
        assert "checkpoints.json" not in err
    _one_line_error(_anole("evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--ways", "5"),
                    "nope.pt does not exist")


# --- 7. a full disk while checkpointing ------------------------------------------------------


def _fill_disk_at(monkeypatch, match) -> None:
    """Make the atomic write of any file whose name `match`es run out of space."""
    real = atomic.atomic_write

    def full(path, write):
        def no_space(f):
            raise OSError(errno.ENOSPC, "No space left on device")

        real(path, no_space if match(Path(path).name) else write)

    monkeypatch.setattr(atomic, "atomic_write", full)


@pytest.mark.parametrize("stage", ["step-00000009.pt", "step-00000009.json", "best-", "best.json"])
def test_a_full_disk_while_checkpointing_keeps_the_earlier_checkpoints(run, images, monkeypatch, stage):
    ckpts = CheckpointDir(run / "checkpoints")
    before = _hashes(ckpts.root)
    if stage.startswith("best"):  # force a new best at step 9: every validation beats -1
        meta = ckpts.latest()
        state = {**meta.state, "best_val": -1.0}
        ckpts.save(6, state, meta.manifest)
        before = _hashes(ckpts.root)
    _fill_disk_at(monkeypatch, lambda name: name.startswith(stage))
    with pytest.raises(DiskFullError) as caught:
        Trainer(_cfg(9), images, run, log_tensorboard=False).run(resume=True)
    message = str(caught.value)
    assert "\n" not in message and stage in message and "nothing was lost" in message
    after = _hashes(ckpts.root)
    assert {k: v for k, v in after.items() if k in before} == before  # none changed or pruned
    for manifest in ckpts.root.glob("*.json"):  # no manifest without its payload
        load_checkpoint(manifest)
    assert not list(ckpts.root.glob(".*.tmp"))


def test_a_full_disk_is_one_line_from_anole_train(run, omniglot_store, monkeypatch):
    before, best = _hashes(run / "checkpoints"), load_model(run).step
    _fill_disk_at(monkeypatch, lambda name: name.startswith("step-00000009"))
    result = _anole("train", "--out", str(run), "--store", str(omniglot_store.root), "--steps", "9",
                    "--resume", *(x for o in TINY for x in ("--set", o)))
    _one_line_error(result, "no space left", "step-00000009.pt", "nothing was lost")
    assert _hashes(run / "checkpoints") == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(run).step == best


def test_a_full_disk_while_rewriting_a_step_puts_the_old_pair_back(tmp_path, monkeypatch):
    ckpts = CheckpointDir(tmp_path)
    ckpts.save(3, _state(3), {"try": 1})
    before = _hashes(tmp_path)
    _fill_disk_at(monkeypatch, lambda name: name == "step-00000003.json")
    with pytest.raises(DiskFullError, match="step-00000003.json"):
        ckpts.save(3, _state(4), {"try": 2})
    assert _hashes(tmp_path) == before
    assert torch.equal(load_checkpoint(ckpts.step_path(3)).state["meta"]["w"], _state(3)["meta"]["w"])


def test_a_full_disk_while_logging_metrics_is_one_line(tmp_path, monkeypatch):
    import builtins

    from pipeline.train import append_metrics

    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(DiskFullError, match="metrics.jsonl; nothing was lost"):
        append_metrics(tmp_path, {"step": 1})


def test_a_temp_file_left_by_a_killed_write_is_swept_at_the_next_save(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep_last=2)
    state = {"meta": {"params": {"w": torch.zeros(2)}}}
    ckpts.save(1, state, {"config": {}})
    (tmp_path / ".step-00000002.pt.k1ll3d.tmp").write_bytes(b"half a payload")  # SIGKILL mid-write
    ckpts.save(2, state, {"config": {}})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert ckpts.steps() == [1, 2]
