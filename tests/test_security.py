"""What anole reads from disk never runs code, and what it starts is not reachable from outside.

Fast checks without servers. The end-to-end ones run inside tests/test_flows.py, on its Prefect
server and local Ray: a planted cached result never runs, every socket of a local Ray is on
loopback and its token is owner-only, a bad inbox source is quarantined.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from flows.tasks import cached_result_problem
from pipeline.errors import ConfigError


def _record(result, **serializer) -> bytes:
    """A result record as Prefect writes it with the JSON serializer, its fields then changed."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer

    meta = ResultRecordMetadata(serializer=JSONSerializer())
    record = json.loads(ResultRecord(metadata=meta, result=result).serialize())
    record["metadata"]["serializer"].update(serializer)
    return json.dumps(record).encode()


def test_only_plain_json_result_records_pass():
    report = {"source": "/data/x.zip", "domains": [{"name": "Latin", "version": 1}], "ok": None}
    assert cached_result_problem(_record(report)) is None

    record = json.loads(_record(report))
    legacy = {"data": record["result"], "serializer": {"type": "pickle"}}
    hostile = {
        "a bare pickle": pickle.dumps(report),
        "not a record": json.dumps(report).encode(),
        "a legacy blob": json.dumps(legacy).encode(),
        "another jsonlib": _record(report, jsonlib="pickle"),
        "another decoder": _record(report, object_decoder="builtins.eval"),
        "a type to build": _record({"path": Path("/etc")}),  # Prefect's encoder: a __class__
        "a pickle serializer": _record(report, type="pickle"),
    }
    problems = {name: cached_result_problem(data) for name, data in hostile.items()}
    assert all(problems.values()), problems
    assert "serializer" in problems["a pickle serializer"]
    assert "Python type" in problems["a type to build"]


def test_a_new_ray_token_is_owner_only_and_an_open_one_is_tightened(tmp_path, monkeypatch):
    from workers.driver import secure_auth_token

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert secure_auth_token(create=False) is None  # joining a cluster: no token invented
    assert not (tmp_path / ".ray").exists()
    token = secure_auth_token()
    assert token == tmp_path / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600
    assert (token.parent.stat().st_mode & 0o777) == 0o700
    value = token.read_text()
    assert len(value) == 64 and int(value, 16) >= 0  # 256 bits in hex, as Ray makes them
    assert list(token.parent.iterdir()) == [token]  # no temporary file left behind

    token.chmod(0o644)  # as Ray writes it
    assert secure_auth_token() == token and token.read_text() == value
    assert token.stat().st_mode & 0o777 == 0o600

    named = tmp_path / "cluster-token"
    named.write_text("abc")
    named.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert secure_auth_token() == named and named.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert secure_auth_token() is None


def test_the_local_ray_bind_setting(monkeypatch):
    from workers.driver import BIND_ENV, local_bind

    monkeypatch.delenv(BIND_ENV, raising=False)
    assert local_bind() == "loopback"
    monkeypatch.setenv(BIND_ENV, "ALL")
    assert local_bind() == "all"
    monkeypatch.setenv(BIND_ENV, "0.0.0.0")
    with pytest.raises(ConfigError, match="ANOLE_RAY_BIND='0.0.0.0': must be loopback"):
        local_bind()
