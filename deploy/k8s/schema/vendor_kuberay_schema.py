"""Regenerate kuberay-<tag>.json: the OpenAPI schemas of KubeRay's RayCluster and RayJob CRDs.

tests/test_deploy.py validates deploy/k8s/*.yaml against them offline (no API server here), the
way `kubectl apply --validate=strict` would: unknown fields are errors. Descriptions are dropped
and sub-schemas that repeat (the pod template appears five times) are stored once under $defs,
which takes 2.3 MB of CRD YAML down to a small JSON file.

    git clone https://github.com/ray-project/kuberay /tmp/kuberay
    python deploy/k8s/schema/vendor_kuberay_schema.py /tmp/kuberay v1.7.0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MIN_SHARED_CHARS = 1500
SCHEMA_MAPS = ("properties", "patternProperties", "definitions", "$defs")


def _canon(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def share_repeats(roots: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sub-schemas that occur more than once (and are big) moved to $defs, referenced by $ref."""
    counts: Counter[str] = Counter()

    def count(node: Any) -> None:
        if isinstance(node, dict):
            counts[_canon(node)] += 1
            for v in node.values():
                count(v)
        elif isinstance(node, list):
            for v in node:
                count(v)

    for root in roots.values():
        count(root)
    shared = {c for c, n in counts.items() if n > 1 and len(c) >= MIN_SHARED_CHARS}
    names = {c: "s" + hashlib.sha256(c.encode()).hexdigest()[:12] for c in shared}
    defs: dict[str, Any] = {}

    def replace(node: Any, top: bool = False) -> Any:
        """`node` is a schema: it may become a $ref; its sub-schemas are replaced in turn."""
        if isinstance(node, dict):
            canon = _canon(node)
            if not top and canon in names:
                name = names[canon]
                if name not in defs:
                    defs[name] = None  # reserve: recursion below may meet it again
                    defs[name] = replace(node, top=True)
                return {"$ref": f"#/$defs/{name}"}
            out = {}
            for key, value in node.items():
                if key in SCHEMA_MAPS and isinstance(value, dict):
                    # A map from field names to schemas: never a schema itself.
                    out[key] = {name: replace(sub) for name, sub in value.items()}
                else:
                    out[key] = replace(value)
            return out
        if isinstance(node, list):
            return [replace(v) for v in node]
        return node

    out = {kind: replace(root) for kind, root in roots.items()}
    return out, dict(sorted(defs.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kuberay", type=Path, help="a clone of github.com/ray-project/kuberay")
    parser.add_argument("tag", help="the release tag to read, e.g. v1.7.0")
    args = parser.parse_args()
    git = ["git", "-C", str(args.kuberay)]
    commit = subprocess.check_output([*git, "rev-parse", f"{args.tag}^{{commit}}"], text=True)
    roots = {}
    for kind, name in CRDS.items():
        text = subprocess.check_output(
            [*git, "show", f"{args.tag}:ray-operator/config/crd/bases/{name}"], text=True
        )
        crd = yaml.safe_load(text)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        roots[kind] = strip_descriptions(version["schema"]["openAPIV3Schema"])
    kinds, defs = share_repeats(roots)
    out = Path(__file__).with_name(f"kuberay-{args.tag}.json")
    doc = {
        "source": "https://github.com/ray-project/kuberay ray-operator/config/crd/bases",
        "tag": args.tag,
        "commit": commit.strip(),
        "api_version": "ray.io/v1",
        "kinds": kinds,
        "$defs": defs,
    }
    out.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(defs)} shared sub-schemas)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
