"""Least privilege, proven from the API server's audit log: every verb the chart grants the operator was
used during the cluster tests, and nothing the operator asked for was forbidden. (Runs after the others.)"""

from __future__ import annotations

import json

from .conftest import OPERATOR_NS, RELEASE, render_chart


def test_every_granted_verb_is_used_and_nothing_is_forbidden(cluster, operator):
    user = f"system:serviceaccount:{OPERATOR_NS}:{RELEASE}-qwen-operator"
    used: set[tuple[str, str, str]] = set()
    forbidden = []
    for line in cluster.dc.audit_log.read_text(errors="replace").splitlines():
        ev = json.loads(line)
        if ev.get("user", {}).get("username") != user:
            continue
        ref = ev.get("objectRef") or {}
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        code = (ev.get("responseStatus") or {}).get("code", 0)
        if (ev.get("annotations") or {}).get("authorization.k8s.io/decision") == "forbid":
            forbidden.append((ev["verb"], ref))  # RBAC said no (a 403 from admission is something else)
        used.add((ref.get("apiGroup", ""), resource, ev["verb"]))
        if ev["verb"] == "patch" and code == 201:  # server-side apply that created the object
            used.add((ref.get("apiGroup", ""), resource, "create"))
    assert not forbidden, forbidden[:5]
    granted = set()
    for doc in render_chart(cluster):
        if doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for res in rule["resources"]:
                        for verb in rule["verbs"]:
                            granted.add((group, res, verb))
    unused = sorted(granted - used)
    assert not unused, f"granted but never used: {unused}"
