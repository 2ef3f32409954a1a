"""Prefect flows: the pipeline, retraining on new domains, ingestion, and the main job.

They only orchestrate: every step is a task in `flows/tasks.py` over `pipeline/` and `workers/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pipeline.errors import AnoleError, ConfigError, IngestError

from .champions import Champions, tried_before
from .tasks import (
    RESULT_SERIALIZER,
    build_task_pools,
    evaluate,
    ingest_domain,
    meta_train,
    promote,
)
from .workspace import (
    PoolSettings,
    PromotionPolicy,
    Workspace,
    WorkspaceConfig,
    extend_split,
    inbox_sources,
    list_source_domains,
    quarantine_source,
)


def _config(learner: str | None, overrides: dict[str, Any] | None, **budget: Any):
    from pipeline.config import config_for

    fields = {**(overrides or {}), **{k: v for k, v in budget.items() if v is not None}}
    return config_for(learner, **fields)


def _ingest_sources(root: str, sources: list[str], holdout: set[str]) -> list[dict[str, Any]]:
    """Ingest every source; multi-domain sources that hold a held-out domain go domain by domain."""
    reports = []
    for source in sources:
        names = list_source_domains(source) if holdout else []
        if names and holdout & set(names):
            for name in names:
                if name not in holdout:
                    reports.append(ingest_domain(source, root, domain=name))
        else:
            reports.append(ingest_domain(source, root))
    # A cached ingest is only trusted if the store still holds what it reported.
    present = {d.name for d in Workspace(root).store().domains()}
    for i, report in enumerate(reports):
        if any(d["name"] not in present for d in report["domains"]):
            domain = report["domains"][0]["name"] if len(report["domains"]) == 1 else None
            reports[i] = ingest_domain.with_options(refresh_cache=True)(
                report["source"], root, domain=domain
            )
    return reports


def _build_pools(
    root: str, data_version: str, split: dict[str, Any], settings: dict[str, Any]
) -> dict[str, Any]:
    """build_task_pools, trusting a cached result only while its files exist."""
    pools = build_task_pools(root, data_version, split, settings)
    paths = [Path(e["path"]) for part in pools["pools"].values() for e in part.values()]
    if not all(p.exists() for p in paths):
        pools = build_task_pools.with_options(refresh_cache=True)(
            root, data_version, split, settings
        )
    return pools


def _workspace_config(
    ws: Workspace,
    cfg,
    domains: list[str],
    *,
    val_domains: int,
    test_domains: int,
    pools: dict[str, Any] | None,
    policy: dict[str, float] | None,
) -> WorkspaceConfig:
    """The workspace's fixed split and settings, created on first use."""
    from pipeline.tasks import split_domains
    from pipeline.train import learner_class

    with ws.locked():
        existing = ws.read_config()
        if existing is not None:
            return existing
        settings = {
            "image_size": cfg.image_size,
            "channels": cfg.channels,
            "invert": cfg.invert,
            # Learners with a classifier head score at most that many ways.
            **({"ways": min(PoolSettings().ways, cfg.ways)} if learner_class(cfg).has_head else {}),
            **(pools or {}),
        }
        created = WorkspaceConfig(
            split=split_domains(domains, val=val_domains, test=test_domains, seed=cfg.split_seed),
            pools=PoolSettings.from_dict(settings),
            policy=PromotionPolicy.from_dict(policy),
        )
        ws.write_config(created)
        return created


def _current_split(ws: Workspace, wcfg: WorkspaceConfig):
    names = [d.name for d in ws.store().domains()]
    missing = sorted(set(wcfg.split.all) - set(names))
    if missing:
        raise ConfigError(
            f"the workspace split names domains the store lacks: {missing}; ingest them again "
            f"or start a new workspace"
        )
    return extend_split(wcfg.split, names)


@flow(name="anole-pipeline", result_serializer=RESULT_SERIALIZER)
def anole_pipeline(
    root: str,
    sources: list[str] | None = None,
    holdout: list[str] | None = None,
    learner: str | None = None,
    minutes: float = 7.5,
    steps: int | None = None,
    overrides: dict[str, Any] | None = None,
    workers: int = 0,
    warm_start: bool = False,
    val_domains: int = 1,
    test_domains: int = 1,
    pools: dict[str, Any] | None = None,
    policy: dict[str, float] | None = None,
    oneshot: bool = True,
) -> dict[str, Any]:
    """Ingest sources, build task pools, meta-train, evaluate and promote: the pipeline once."""
    logger = get_run_logger()
    ws = Workspace(root)
    ingested = _ingest_sources(root, [str(s) for s in sources or []], set(holdout or []))
    store = ws.store()
    domains = [d.name for d in store.domains()]
    if not domains:
        raise AnoleError(f"the store {ws.store_dir} is empty: pass sources to ingest")
    # A step count, when given, wins over the time budget.
    cfg = _config(learner, overrides, minutes=None if steps else minutes or None, steps=steps)
    wcfg = _workspace_config(
        ws,
        cfg,
        domains,
        val_domains=val_domains,
        test_domains=test_domains,
        pools=pools,
        policy=policy,
    )
    split = _current_split(ws, wcfg)
    data_version = store.data_version()
    logger.info(
        f"{len(domains)} domains (data version {data_version[:12]}): train {list(split.train)}, "
        f"val {list(split.val)}, test {list(split.test)}"
    )
    pool = _build_pools(root, data_version, split.to_dict(), _asdict(wcfg.pools))
    champion = Champions(ws).current()
    init = champion["checkpoint"] if warm_start and champion else None
    checkpoint = meta_train(
        root, cfg.to_dict(), split.to_dict(), data_version, workers=workers, init_checkpoint=init
    )
    ev = evaluate(
        root,
        checkpoint,
        pool,
        champion_checkpoint=champion["checkpoint"] if champion else None,
        champion_run_dir=champion["run_dir"] if champion else None,
        oneshot=oneshot,
    )
    # An explicit policy applies to this promotion; otherwise the workspace's.
    decision = promote(root, checkpoint, ev["scores"], policy=policy, report=ev["report"])
    return {
        "status": "promoted" if decision["promoted"] else "kept",
        "root": str(ws.root),
        "ingested": [
            {"source": r["source"], "domains": [(d["name"], d["outcome"]) for d in r["domains"]]}
            for r in ingested
        ],
        "data_version": data_version,
        "split": split.to_dict(),
        "checkpoint": checkpoint,
        "run_dir": str(Path(checkpoint).parent.parent),
        "report": ev["report"],
        "figures": ev["scores"]["figures"],
        "accuracy": _summary(ev["scores"]),
        **decision,
    }


@flow(name="retrain-on-new-domains", result_serializer=RESULT_SERIALIZER)
def retrain_on_new_domains(
    root: str,
    inbox: str | None = None,
    minutes: float = 2.0,
    steps: int | None = None,
    workers: int = 0,
    oneshot: bool = True,
) -> dict[str, Any]:
    """Retrain the champion on domains that arrived since it was trained; promote if better."""
    logger = get_run_logger()
    ws = Workspace(root)
    rejected = _ingest_inbox(inbox, root) if inbox else []
    champion = Champions(ws).current()
    if champion is None:
        message = f"no champion in {ws.root} yet: run the pipeline first (`anole run`)"
        logger.info(message)
        return {"status": "no-champion", "message": message, "rejected": rejected}
    store = ws.store()
    infos = store.domains()
    new = sorted(i.name for i in infos if champion["domains"].get(i.name) != i.content_hash)
    if not new:
        message = (
            f"nothing new: the store's {len(infos)} domains are the ones champion "
            f"{champion['id']} was trained on"
        )
        logger.info(message)
        return {
            "status": "up-to-date",
            "message": message,
            "rejected": rejected,
            "champion": champion["id"],
            "champion_checkpoint": champion["checkpoint"],
        }
    data_version = store.data_version()
    prior = tried_before(Champions(ws).read(), champion["id"], data_version)
    if prior is not None:
        message = (
            f"already tried {', '.join(new)} against champion {champion['id']} on this data "
            f"(not promoted: {'; '.join(prior['reasons'])}); ingest more data to try again"
        )
        logger.info(message)
        return {
            "status": "already-tried",
            "message": message,
            "rejected": rejected,
            "new_domains": new,
            "champion": champion["id"],
            "champion_checkpoint": champion["checkpoint"],
        }
    logger.info(f"new since {champion['id']}: {', '.join(new)}; retraining from it")

    from pipeline.config import TrainConfig

    wcfg = ws.read_config()
    if wcfg is None:
        raise ConfigError(f"{ws.config_file} is missing; run the pipeline on this workspace first")
    split = _current_split(ws, wcfg)
    budget = {"steps": steps, "minutes": 0.0} if steps else {"minutes": minutes}
    cfg = TrainConfig.from_saved({**champion["config"], **budget})
    pool = _build_pools(root, data_version, split.to_dict(), _asdict(wcfg.pools))
    checkpoint = meta_train(
        root,
        cfg.to_dict(),
        split.to_dict(),
        data_version,
        workers=workers,
        init_checkpoint=champion["checkpoint"],
    )
    ev = evaluate(
        root,
        checkpoint,
        pool,
        champion_checkpoint=champion["checkpoint"],
        champion_run_dir=champion["run_dir"],
        new_domains=new,
        oneshot=oneshot,
    )
    decision = promote(root, checkpoint, ev["scores"], report=ev["report"])
    return {
        "status": "promoted" if decision["promoted"] else "refused",
        "new_domains": new,
        "rejected": rejected,
        "previous_champion": champion["id"],
        "checkpoint": checkpoint,
        "report": ev["report"],
        "figures": ev["scores"]["figures"],
        "accuracy": _summary(ev["scores"]),
        **decision,
    }


def _ingest_inbox(inbox: str, root: str) -> list[str]:
    """Ingest every source waiting in the inbox; return the ones rejected.

    A source that is bad input (IngestError) is quarantined: moved to `<inbox>/rejected/` with
    its error beside it, so it fails neither this retrain nor any later one. Other errors (a full
    disk, a damaged store) are not the source's fault and fail the run as before.
    """
    logger = get_run_logger()
    rejected = []
    for source in inbox_sources(inbox):
        try:
            ingest_domain(str(source), root)
        except IngestError as exc:
            moved = quarantine_source(source, exc)
            logger.warning(f"rejected {source.name}: {exc}; moved to {moved}, error beside it")
            rejected.append(str(moved))
    return rejected


@flow(name="ingest", result_serializer=RESULT_SERIALIZER)
def ingest_flow(source: str, root: str, domain: str | None = None) -> dict[str, Any]:
    """Ingest one folder or zip into the workspace store (emits anole.domain.arrived)."""
    return ingest_domain(source, root, domain=domain)


@flow(name="anole-main-job", result_serializer=RESULT_SERIALIZER)
def main_job(
    root: str,
    sources: list[str],
    holdout: list[str] | None = None,
    holdout_count: int = 2,
    learner: str | None = None,
    minutes: float = 10.0,
    steps: int | None = None,
    retrain_steps: int | None = None,
    retrain_share: float = 0.25,
    overrides: dict[str, Any] | None = None,
    workers: int = 0,
    pools: dict[str, Any] | None = None,
    policy: dict[str, float] | None = None,
    oneshot: bool = True,
) -> dict[str, Any]:
    """The whole story: train on some alphabets, then a held-out one arrives and is learned."""
    logger = get_run_logger()
    available = {name: src for src in sources for name in list_source_domains(src)}
    held = list(holdout) if holdout is not None else sorted(available)[-holdout_count:]
    unknown = sorted(set(held) - set(available))
    if unknown:
        raise ConfigError(f"held-out domains {unknown} are in none of the sources")
    logger.info(f"holding out {held} as domains that arrive later")
    ws = Workspace(root)
    earlier = Champions(ws).read()["history"]
    present = {d.name for d in ws.store().domains()} if ws.store_dir.exists() else set()
    if earlier and set(held) <= present:
        # A rerun after the arrival: the first training is done (a crashed retrain resumes).
        message = (
            f"{earlier[0]['id']} was trained before {', '.join(held)} arrived; "
            "skipping the first training"
        )
        logger.info(message)
        first = {
            "status": "done before",
            "message": message,
            "champion": earlier[0]["id"],
            "report": earlier[0].get("report"),
            "reasons": [],
        }
    else:
        first = anole_pipeline(
            root,
            sources=[str(s) for s in sources],
            holdout=held,
            learner=learner,
            minutes=minutes * (1 - retrain_share) if not steps else 0.0,
            steps=steps,
            overrides=overrides,
            workers=workers,
            pools=pools,
            policy=policy,
            oneshot=oneshot,
        )
    # A new domain arrives: ingesting it emits anole.domain.arrived (a served deployment would
    # react to that event; here the retrain runs right after).
    arrivals = [ingest_domain(str(available[name]), root, domain=name) for name in held]
    second = retrain_on_new_domains(
        root,
        minutes=minutes * retrain_share if not retrain_steps else 0.0,
        steps=retrain_steps,
        workers=workers,
        oneshot=oneshot,
    )
    champion = Champions(Workspace(root)).current()
    return {
        "root": str(Workspace(root).root),
        "holdout": held,
        "pipeline": first,
        "arrivals": [
            {"source": a["source"], "domains": [(d["name"], d["outcome"]) for d in a["domains"]]}
            for a in arrivals
        ],
        "retrain": second,
        "champion": champion["id"] if champion else None,
        "champion_checkpoint": champion["checkpoint"] if champion else None,
        "champions_registry": str(Workspace(root).champions_file),
    }


def _asdict(settings: PoolSettings) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(settings)


def _summary(scores: dict[str, Any]) -> dict[str, Any]:
    """Split (and one-shot) accuracies of candidate and champion, as plain numbers."""
    out: dict[str, Any] = {}
    for who in ("candidate", "champion"):
        s = scores.get(who)
        if s:
            out[who] = {p: {"mean": a["mean"], "ci95": a["ci95"]} for p, a in s["splits"].items()}
            if "oneshot" in s:
                out[who]["oneshot"] = {"mean": s["oneshot"]["mean"], "ci95": s["oneshot"]["ci95"]}
    return out
