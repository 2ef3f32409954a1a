"""The champion registry and the promotion rule (plain Python: no Prefect, no Ray).

`champions.json` in the workspace root, always replaced atomically under a lock::

    {"format": 1,
     "champion": "champion-002",                 # the current champion's id, or null
     "history": [ {id, checkpoint, run_dir, promoted_at, data_version, domains, split,
                   learner, config, scores, reason, previous}, ... ],   # every champion, oldest first
     "decisions": [ {at, candidate, champion, promoted, reasons, validation, forgetting,
                     data_version, new_domains}, ... ]}                 # every promote() call

A champion's checkpoint is copied to `champions/<id>/model.pt` (+ its manifest), so pruning or
deleting training runs never breaks the registry.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_path, atomic_write_json
from pipeline.errors import AnoleError

from .workspace import PromotionPolicy, Workspace

REGISTRY_FORMAT = 1


@dataclass
class Decision:
    """The outcome of comparing a candidate with the champion."""

    promoted: bool
    reasons: list[str]
    validation: dict[str, float | None] = field(default_factory=dict)
    """candidate, champion and delta of validation accuracy."""
    forgetting: dict[str, Any] = field(default_factory=dict)
    """Per old domain accuracy drop (champion - candidate), their mean, and the margin."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validation_accuracy(scores: dict[str, Any]) -> float | None:
    """Mean accuracy on the validation split (else test, else every domain) of one model's scores."""
    splits = scores.get("splits", {})
    for name in ("val", "test"):
        if splits.get(name):
            return float(splits[name]["mean"])
    domains = scores.get("domains", {})
    if domains:
        return float(sum(d["mean"] for d in domains.values()) / len(domains))
    return None


def decide(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    old_domains: list[str] | tuple[str, ...],
    policy: PromotionPolicy,
) -> Decision:
    """Promote when there is no champion, or when the candidate beats it on validation AND its
    mean accuracy on the champion's training domains (`old_domains`) drops by at most
    `policy.forgetting_margin` (the forgetting guard). Both models' scores must come from the
    same evaluation episodes.
    """
    cand_val = validation_accuracy(candidate)
    if champion is None:
        return Decision(True, ["no champion yet"], {"candidate": cand_val})
    champ_val = validation_accuracy(champion)
    reasons: list[str] = []
    delta = None if cand_val is None or champ_val is None else cand_val - champ_val
    beats = delta is not None and delta > policy.min_improvement
    if delta is None:
        reasons.append("no validation accuracy to compare")
    elif beats:
        reasons.append(
            f"validation {100 * cand_val:.2f}% beats the champion's {100 * champ_val:.2f}% "
            f"(+{100 * delta:.2f} pp > {100 * policy.min_improvement:.2f} pp)"
        )
    else:
        reasons.append(
            f"validation {100 * cand_val:.2f}% does not beat the champion's "
            f"{100 * champ_val:.2f}% by more than {100 * policy.min_improvement:.2f} pp"
        )

    cand_dom, champ_dom = candidate.get("domains", {}), champion.get("domains", {})
    drops = {
        d: float(champ_dom[d]["mean"] - cand_dom[d]["mean"])
        for d in old_domains
        if d in cand_dom and d in champ_dom
    }
    mean_drop = sum(drops.values()) / len(drops) if drops else 0.0
    forgets = mean_drop > policy.forgetting_margin
    if drops:
        worst = max(drops, key=lambda d: drops[d])
        verdict = "exceeds" if forgets else "within"
        reasons.append(
            f"old domains: mean drop {100 * mean_drop:+.2f} pp over {len(drops)} domains "
            f"(worst {worst} {100 * drops[worst]:+.2f} pp), {verdict} the "
            f"{100 * policy.forgetting_margin:.2f} pp forgetting margin"
        )
    else:
        reasons.append("no old domains to check for forgetting")
    return Decision(
        promoted=beats and not forgets,
        reasons=reasons,
        validation={"candidate": cand_val, "champion": champ_val, "delta": delta},
        forgetting={
            "drops": drops,
            "mean_drop": mean_drop,
            "margin": policy.forgetting_margin,
            "refused": forgets,
        },
    )


class Champions:
    """Read and update `champions.json` of a workspace (atomic writes under a file lock)."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.path = workspace.champions_file

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": REGISTRY_FORMAT, "champion": None, "history": [], "decisions": []}
        try:
            data = json.loads(self.path.read_text())
        except ValueError as exc:
            raise AnoleError(
                f"champion registry {self.path} is unreadable ({exc}); restore it from a backup"
            ) from exc
        data.setdefault("history", [])
        data.setdefault("decisions", [])
        return data

    def current(self) -> dict[str, Any] | None:
        """The current champion's record, or None."""
        data = self.read()
        for record in data["history"]:
            if record["id"] == data.get("champion"):
                return record
        return None

    def record(
        self,
        decision: dict[str, Any],
        *,
        candidate_checkpoint: str | Path,
        entry: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append `decision`; when `entry` is given, make it the new champion.

        The champion's checkpoint (and manifest) is copied into `champions/<id>/` first, so the
        registry never names a file that is not there. Returns the new champion record (or None).
        """
        with self.workspace.locked("champions"):
            data = self.read()
            now = datetime.now(UTC).isoformat(timespec="seconds")
            new = None
            if entry is not None:
                champion_id = f"champion-{len(data['history']) + 1:03d}"
                checkpoint = self._copy_checkpoint(Path(candidate_checkpoint), champion_id)
                new = {
                    **entry,
                    "id": champion_id,
                    "checkpoint": str(checkpoint),
                    "source_checkpoint": str(candidate_checkpoint),
                    "promoted_at": now,
                    "previous": data.get("champion"),
                }
                data["history"].append(new)
                data["champion"] = champion_id
            data["decisions"].append(
                {
                    **decision,
                    "at": now,
                    "candidate": str(candidate_checkpoint),
                    "champion_after": data.get("champion"),
                }
            )
            atomic_write_json(self.path, data)
            return new

    def _copy_checkpoint(self, source: Path, champion_id: str) -> Path:
        target = self.workspace.champions_dir / champion_id / "model.pt"
        for src, dst in (
            (source, target),
            (source.with_suffix(".json"), target.with_suffix(".json")),
        ):
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        return target


def tried_before(
    registry: dict[str, Any], champion_id: str | None, data_version: str
) -> dict | None:
    """The decision, if any, already taken for a candidate against this champion on this data."""
    for decision in reversed(registry.get("decisions", [])):
        if decision.get("champion") == champion_id and decision.get("data_version") == data_version:
            return decision
    return None
