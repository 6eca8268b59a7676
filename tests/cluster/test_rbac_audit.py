"""Least privilege, proven from the API server's audit log: every verb the chart grants the operator was
used during the cluster tests, and nothing the operator asked for was forbidden. (Runs after the others.)"""

from __future__ import annotations

import json
from datetime import datetime

from .conftest import OPERATOR_NS, RELEASE, render_chart


def test_every_granted_verb_is_used_and_nothing_is_forbidden(cluster, operator):
    user = f"system:serviceaccount:{OPERATOR_NS}:{RELEASE}-qwen-operator"
    restarts = cluster.dc.apiserver_starts[1:] + [operator.rbac_applied_at]
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
            # RBAC said no (a 403 from admission is something else). Right after an API server (re)starts, or
            # new bindings are made, its RBAC caches are still filling for a moment: that is not a missing rule.
            at = datetime.fromisoformat(ev["stageTimestamp"].replace("Z", "+00:00")).timestamp()
            if not any(0 <= at - start < 30 for start in restarts):
                forbidden.append((ev["verb"], ref))
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
