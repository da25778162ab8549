"""Vendor the schema of a published CustomResourceDefinition for the k8s tests.

    git -C <mirror of the repo> show <tag>:<path> | python tests/crds/vendor.py <owner/repo> <tag> <commit> <path>

writes tests/crds/<group>_<plural>.json: the openAPIV3Schema of the CRD's storage version, without its
`description`s (they are most of the bytes and validate nothing), under a `source` header that says
where it came from. Re-run it to move to a newer operator release."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def strip_descriptions(node):
    if isinstance(node, dict):
        # A `description` keyword is a string; a property *named* description is a schema (a dict), kept.
        return {k: strip_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(repo: str, tag: str, commit: str, path: str) -> None:
    crd = yaml.safe_load(sys.stdin.read())
    [version] = [v for v in crd["spec"]["versions"] if v.get("storage")]
    out = {
        "source": {"repo": f"https://github.com/{repo}", "tag": tag, "commit": commit, "path": path},
        "group": crd["spec"]["group"],
        "kind": crd["spec"]["names"]["kind"],
        "version": version["name"],
        "scope": crd["spec"]["scope"],
        "openAPIV3Schema": strip_descriptions(version["schema"]["openAPIV3Schema"]),
    }
    target = Path(__file__).parent / f"{crd['spec']['group']}_{crd['spec']['names']['plural']}.json"
    target.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    print(target)


if __name__ == "__main__":
    main(*sys.argv[1:])
