"""Prefect flows on real components: a temporary Prefect server, a local Ray, the Omniglot zip.

Sizes are tiny (hidden=8, a few steps, a few episodes) so the whole module takes about a minute.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
from pathlib import Path

import pytest

from flows.champions import decide
from flows.workspace import PromotionPolicy

TINY = {
    "ways": 5,
    "hidden": 8,
    "meta_batch": 2,
    "val_episodes": 5,
    "val_every": 2,
    "checkpoint_every": 1,
    "keep_last": 2,
    "image_size": 28,
    "num_threads": 1,  # a shared 2-core machine: more torch threads only spin
}
POOLS = {"ways": 5, "episodes": 4}


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect server and database; results and caches in a temporary PREFECT_HOME."""
    from prefect.events.worker import EventsWorker
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    # An events worker left by an earlier module still points at that module's (stopped) server;
    # stopping it here makes the next event open a fresh one against this harness.
    EventsWorker.drain_all(timeout=5)
    home = tmp_path_factory.mktemp("prefect-home")
    updates = {PREFECT_HOME: home, PREFECT_RESULTS_LOCAL_STORAGE_PATH: home / "storage"}
    with temporary_settings(updates=updates), prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def zip1(omniglot_zips) -> Path:
    """images_background_small1.zip: Balinese, Early_Aramaic, Greek, Korean, Latin."""
    return omniglot_zips[0]


def _task_states(flow_run_id, timeout_s: float = 20.0) -> dict[str, list[str]]:
    """{task run name: [state names]} of a flow run, once every task run is final."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if (runs and all(r.state and r.state.is_final() for r in runs)) or (
                time.monotonic() > deadline
            ):
                break
            time.sleep(0.5)
    states: dict[str, list[str]] = {}
    for r in runs:
        states.setdefault(r.name, []).append(r.state.name if r.state else "?")
    return states


def _events(resource_prefix: str, timeout_s: float = 20.0) -> list:
    """anole.domain.arrived events whose resource id starts with `resource_prefix`."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=30)
    flt = EventFilter(
        event=EventNameFilter(name=["anole.domain.arrived"]),
        resource=EventResourceFilter(id_prefix=[resource_prefix]),
    )
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(filter=flt, limit=50).events
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def _is_png(path: str | Path) -> bool:
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _listening_sockets() -> set[tuple[str, str]]:
    """(process name, address) of every listening TCP socket of this process and its children
    (a local Ray's gcs_server, raylet, agents and workers are all started from here)."""
    import psutil  # Ray's own copy: ray puts it on the path

    me = psutil.Process()
    found = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
            found |= {(proc.name(), c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # it exited meanwhile
            continue
    return found


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


# --------------------------------------------------------------------------- end to end


def test_main_job_end_to_end_on_ray_with_a_new_domain(prefect_api, zip1, tmp_path):
    """Ingest 4 alphabets, train on Ray, evaluate, promote; Latin arrives and is learned."""
    from flows.flows import main_job
    from workers.driver import ray_session

    root = tmp_path / "ws"
    job = dict(holdout=["Latin"], steps=3, retrain_steps=2, overrides=TINY, pools=POOLS, workers=1)
    with ray_session(None, 2):
        out = main_job(str(root), [str(zip1)], **job)
        # The local Ray anole started listens on loopback only, and its token is owner-only.
        listening = _listening_sockets()
        assert {"gcs_server", "raylet"} <= {name for name, _ in listening}, listening
        assert all(_is_loopback(ip) for _, ip in listening), listening
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray/auth_token")
        assert token.stat().st_mode & 0o777 == 0o600

    first, second = out["pipeline"], out["retrain"]
    # The first training: 3 train alphabets, 1 val, 1 test; it becomes the first champion.
    assert sorted(first["split"]["train"] + first["split"]["val"] + first["split"]["test"]) == [
        "Balinese",
        "Early_Aramaic",
        "Greek",
        "Korean",
    ]
    assert first["promoted"] and first["champion"] == "champion-001"
    assert json.loads((Path(first["run_dir"]) / "result.json").read_text())["workers"] == 1
    report = Path(first["report"]).read_text()
    assert "## Accuracy by domain" in report and "## Promotion: promoted" in report
    assert set(first["figures"]) == {"learning_curves", "domain_accuracy", "episode"}
    assert all(_is_png(p) for p in first["figures"].values())
    assert "oneshot" in first["accuracy"]["candidate"]  # Lake's runs are under ANOLE_DATA

    # The arrival of Latin was announced as an event naming the domain...
    (event,) = _events("anole.domain.Latin")
    assert event.resource["prefect.resource.name"] == "Latin"
    assert event.payload["version"] == 1 and len(event.payload["content_hash"]) == 64
    assert any(r.role == "store" for r in event.related)

    # ...and the retrain warm-started from the champion, trained on Latin, scored old and new.
    assert second["new_domains"] == ["Latin"] and second["previous_champion"] == "champion-001"
    run = json.loads((Path(second["checkpoint"]).parents[1] / "result.json").read_text())
    assert run["init_checkpoint"].endswith("champions/champion-001/model.pt")
    assert "Latin" in run["split"]["train"]
    scores = json.loads((Path(second["report"]).parent / "scores.json").read_text())
    assert scores["candidate"]["domains"]["Latin"]["new"] is True
    assert set(scores["champion"]["domains"]) == set(scores["candidate"]["domains"])
    # The champion was scored on the old domains' pools once; the retrain only added Latin's.
    champion_sha = json.loads(Path(run["init_checkpoint"]).with_suffix(".json").read_text())
    cached = sorted(
        p.stem.split("-")[0] for p in (root / "scores" / champion_sha["sha256"][:24]).glob("*.json")
    )
    assert cached == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin", "oneshot"]
    assert second["status"] in ("promoted", "refused")
    registry = json.loads((root / "champions.json").read_text())
    assert len(registry["decisions"]) == 2
    assert out["champion"] == ("champion-002" if second["promoted"] else "champion-001")

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {
        "anole-domain-accuracy",
        "anole-split-accuracy",
        "anole-evaluation-report",
        "anole-promotion",
    } <= keys

    # Run the job again: nothing new since, so it retrains nothing and says so.
    runs_before = sorted(p.name for p in (root / "runs").iterdir())
    again = main_job(str(root), [str(zip1)], **job)  # the same job; no Ray: nothing will train
    assert again["pipeline"]["status"] == "done before"
    assert again["retrain"]["status"] == ("up-to-date" if second["promoted"] else "already-tried")
    assert again["retrain"]["message"]
    assert sorted(p.name for p in (root / "runs").iterdir()) == runs_before
    assert again["champion"] == out["champion"]


# --------------------------------------------------------------------------- caching, promotion


def test_rerun_is_cached_and_forgetting_guard_refuses(prefect_api, zip1, tmp_path):
    from flows.flows import anole_pipeline

    root = str(tmp_path / "ws")
    kw = dict(sources=[str(zip1)], steps=2, overrides=TINY, pools=POOLS, oneshot=False)
    first = anole_pipeline(root, **kw)
    assert first["promoted"] and first["champion"] == "champion-001"
    result_json = Path(first["run_dir"]) / "result.json"
    trained = json.loads(result_json.read_text())

    state = anole_pipeline(root, **kw, return_state=True)
    second = state.result()
    states = _task_states(state.state_details.flow_run_id)
    ingest = [s for name, ss in states.items() if name.startswith("ingest-") for s in ss]
    pools = [s for name, ss in states.items() if name.startswith("build-task-pools") for s in ss]
    assert ingest == ["Cached"] and pools == ["Cached"], states
    # The finished training run is found again (not retrained); it is already the champion.
    assert second["checkpoint"] == first["checkpoint"]
    assert json.loads(result_json.read_text())["step"] == trained["step"]
    assert second["already_champion"] and not second["promoted"]

    # A warm-started candidate that beats the champion but "forgets" too much is refused.
    third = anole_pipeline(
        root, **kw, warm_start=True, policy={"min_improvement": -1.0, "forgetting_margin": -1.0}
    )
    assert not third["promoted"] and third["forgetting"]["refused"]
    assert "forgetting margin" in third["reasons"][-1]
    registry = json.loads((Path(root) / "champions.json").read_text())
    assert registry["champion"] == "champion-001" and len(registry["history"]) == 1
    assert [d["promoted"] for d in registry["decisions"]] == [True, False]
    assert "## Promotion: not promoted" in Path(third["report"]).read_text()


def test_meta_train_resumes_after_a_crash(prefect_api, zip1, tmp_path):
    from prefect import flow

    from flows.tasks import meta_train, set_progress_listener
    from flows.workspace import Workspace
    from pipeline.config import config_for
    from pipeline.tasks import split_domains

    ws = Workspace(tmp_path / "ws")
    store = ws.store()
    for name in ("Balinese", "Early_Aramaic", "Greek"):
        store.ingest(zip1, domain=name)
    split = split_domains([d.name for d in store.domains()], val=1, test=0).to_dict()
    cfg = config_for(None, **{**TINY, "steps": 6, "val_every": 3}).to_dict()

    @flow
    def train_once() -> str:
        return meta_train(str(ws.root), cfg, split, store.data_version())

    def crash(done: int, total: int, metrics: dict) -> None:
        if done == 4:  # after the checkpoint of step 3, before step 4's
            raise RuntimeError("simulated crash")

    set_progress_listener(crash)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_once()
    finally:
        set_progress_listener(None)
    (run_dir,) = list(ws.runs_dir.iterdir())
    assert not (run_dir / "result.json").exists()

    checkpoint = train_once()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["resumed_from_step"] == 3 and result["step"] == 6
    assert Path(checkpoint).parents[1] == run_dir
    val_steps = [
        r["step"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").open())
        if "val_accuracy" in r
    ]
    assert val_steps == [0, 3, 6]  # nothing repeated, nothing lost


# --------------------------------------------------------------------------- small pieces


def _scores(val: float, **domains: float) -> dict:
    return {
        "splits": {"val": {"mean": val, "ci95": 0.01}},
        "domains": {d: {"mean": m, "ci95": 0.01, "split": "train"} for d, m in domains.items()},
    }


def test_promotion_rule():
    policy = PromotionPolicy(min_improvement=0.0, forgetting_margin=0.02)
    assert decide(_scores(0.5), None, [], policy).promoted  # no champion yet

    champion = _scores(0.60, a=0.80, b=0.70)
    better = decide(_scores(0.65, a=0.79, b=0.70), champion, ["a", "b"], policy)
    assert better.promoted and better.forgetting["mean_drop"] == pytest.approx(0.005)

    worse = decide(_scores(0.55, a=0.80, b=0.70), champion, ["a", "b"], policy)
    assert not worse.promoted and "does not beat" in worse.reasons[0]

    forgets = decide(_scores(0.70, a=0.70, b=0.66), champion, ["a", "b"], policy)
    assert not forgets.promoted and forgets.forgetting["refused"]
    assert forgets.forgetting["drops"] == pytest.approx({"a": 0.10, "b": 0.04})
    assert "exceeds the 2.00 pp forgetting margin" in forgets.reasons[1]

    lenient = PromotionPolicy(forgetting_margin=0.10)
    assert decide(_scores(0.70, a=0.70, b=0.66), champion, ["a", "b"], lenient).promoted


def test_ingest_validates_and_retrain_needs_a_champion(prefect_api, tmp_path):
    from flows.flows import ingest_flow, retrain_on_new_domains
    from pipeline.errors import IngestError

    with pytest.raises(IngestError, match="does not exist"):
        ingest_flow(str(tmp_path / "missing.zip"), str(tmp_path / "ws"))
    out = retrain_on_new_domains(str(tmp_path / "ws"))
    assert out["status"] == "no-champion" and "run the pipeline first" in out["message"]


# --------------------------------------------------------------------------- hostile files


def _tiny_domain(folder: Path, classes: int = 2, images: int = 2) -> Path:
    """A single-domain folder source of a few 8x8 PNGs: `<folder>/<class>/<i>.png`."""
    from PIL import Image

    for c in range(classes):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(images):
            Image.new("L", (8, 8), color=40 * c + 10 * i).save(folder / f"c{c}" / f"{i}.png")
    return folder


class _Touch:
    """Unpickling this creates `path`: the stand-in for a planted payload's code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


class _Warnings(logging.Handler):
    """The messages of the warnings a logger emits."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _pickled_record(marker: Path) -> bytes:
    """A Prefect result record that names the pickle serializer, as Prefect itself writes one."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    meta = ResultRecordMetadata(serializer=PickleSerializer(picklelib="pickle"))
    return ResultRecord(metadata=meta, result=_Touch(marker)).serialize()


@pytest.mark.parametrize("payload", ["record naming pickle", "bare pickle"])
def test_a_planted_cached_result_never_runs(prefect_api, tmp_path, payload):
    """A pickle planted under the next ingest's cache key is moved aside, never read: the ingest
    recomputes (with a warning) and writes a plain JSON record in its place."""
    import pickle

    from prefect._internal.result_records import ResultRecord
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    from flows.flows import ingest_flow
    from flows.tasks import cached_result_problem, ingest_cache_key

    source, root, marker = _tiny_domain(tmp_path / "tiny"), tmp_path / "ws", tmp_path / "ran"
    record = _pickled_record(marker) if payload != "bare pickle" else pickle.dumps(_Touch(marker))
    # Armed: reading it the way Prefect would runs its code.
    if payload == "bare pickle":
        pickle.loads(record)
    else:
        ResultRecord.deserialize(record)
    assert marker.exists()
    marker.unlink()

    key = ingest_cache_key({"root": str(root), "source": str(source)})
    planted = Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()) / key
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(record)
    warnings = _Warnings()
    logging.getLogger("prefect.task_runs").addHandler(warnings)  # whether or not it propagates
    try:
        report = ingest_flow(str(source), str(root))
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(warnings)

    assert not marker.exists()
    assert [(d["name"], d["outcome"]) for d in report["domains"]] == [("tiny", "new")]
    assert (planted.parent / "rejected" / key).read_bytes() == record
    assert cached_result_problem(planted.read_bytes()) is None  # the recomputed result: JSON
    assert any(m.startswith(f"ignored the cached result {planted}") for m in warnings.messages)


def test_a_bad_inbox_source_is_quarantined_and_the_rest_ingested(prefect_api, tmp_path):
    from flows.flows import retrain_on_new_domains
    from flows.workspace import Workspace

    root, inbox = tmp_path / "ws", tmp_path / "inbox"
    _tiny_domain(inbox / "tiny")
    (inbox / "a-corrupt.zip").write_bytes(b"PK\x03\x04 not a zip" * 8)  # sorts first

    out = retrain_on_new_domains(str(root), inbox=str(inbox))
    assert out["status"] == "no-champion"  # the inbox is ingested before the champion is needed
    assert [d.name for d in Workspace(root).store().domains()] == ["tiny"]
    moved = inbox / "rejected" / "a-corrupt.zip"
    assert out["rejected"] == [str(moved)] and moved.exists()
    assert not (inbox / "a-corrupt.zip").exists()
    error = json.loads((inbox / "rejected" / "a-corrupt.zip.error.json").read_text())
    assert error["type"] == "IngestError" and "neither a folder nor a .zip" in error["error"]

    # The next retrain does not trip over it; another bad file of that name keeps the first.
    (inbox / "a-corrupt.zip").write_bytes(b"still not a zip")
    again = retrain_on_new_domains(str(root), inbox=str(inbox))
    assert again["rejected"] == [str(inbox / "rejected" / "a-corrupt-2.zip")]
    assert moved.exists() and (inbox / "rejected" / "a-corrupt-2.zip.error.json").exists()
    assert retrain_on_new_domains(str(root), inbox=str(inbox))["rejected"] == []
