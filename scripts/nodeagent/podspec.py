"""What a pod's spec means on a process node, as pure functions: environment variables (with `valueFrom`
and `$(VAR)` expansion), downward-API fields, resource quantities, probe ports, the kubelet's restart and
phase rules. Secrets and ConfigMaps come in through a lookup function, so these are testable alone."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any, Callable

from kubernetes.utils.quantity import parse_quantity

Lookup = Callable[[str, str], dict | None]  # (kind, name) -> the object in the pod's namespace, or None


class ConfigError(Exception):
    """A container that cannot be created as specified (the kubelet's CreateContainerConfigError)."""


def quantity(value: Any) -> Decimal:
    return parse_quantity(str(value))


def field_value(pod: dict, path: str) -> str:
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"), "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"), "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.hostIP": status.get("hostIP"), "status.podIP": status.get("podIP"),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or []),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
    }
    if path in simple:
        return simple[path] or ""
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ConfigError(f"fieldRef {path!r} is not supported")


def resource_value(container: dict, ref: dict, allocatable: dict[str, str]) -> str:
    """A resourceFieldRef: the container's limit (node allocatable when it has none) or request, divided by
    the divisor and rounded up, as the kubelet does."""
    resource = ref["resource"]
    kind, _, name = resource.partition(".")
    resources = container.get("resources") or {}
    if kind not in ("limits", "requests") or name not in ("cpu", "memory", "ephemeral-storage"):
        raise ConfigError(f"resourceFieldRef {resource!r} is not supported")
    value = (resources.get(kind) or {}).get(name)
    if value is None and kind == "requests":
        value = (resources.get("limits") or {}).get(name)
    if value is None:
        value = allocatable.get(name, "0") if kind == "limits" else "0"
    divisor = quantity(ref.get("divisor") or "1")
    if divisor == 0:
        raise ConfigError(f"resourceFieldRef {resource!r}: divisor 0")
    return str(math.ceil(quantity(value) / divisor))


def _key_from(lookup: Lookup, kind: str, ref: dict) -> str | None:
    obj = lookup(kind, ref["name"])
    optional = ref.get("optional", False)
    label = "secret" if kind == "Secret" else "configmap"
    if obj is None:
        if optional:
            return None
        raise ConfigError(f'{label} "{ref["name"]}" not found')
    values = decoded_data(obj)
    if ref["key"] not in values:
        if optional:
            return None
        raise ConfigError(f"couldn't find key {ref['key']} in {kind} {obj['metadata']['namespace']}/{ref['name']}")
    return values[ref["key"]].decode(errors="replace")


def decoded_data(obj: dict) -> dict[str, bytes]:
    """A Secret's or ConfigMap's data as bytes per key."""
    import base64

    out: dict[str, bytes] = {}
    if obj.get("kind") == "Secret":
        for k, v in (obj.get("data") or {}).items():
            out[k] = base64.b64decode(v)
        for k, v in (obj.get("stringData") or {}).items():
            out[k] = v.encode()
    else:
        for k, v in (obj.get("data") or {}).items():
            out[k] = v.encode()
        for k, v in (obj.get("binaryData") or {}).items():
            out[k] = base64.b64decode(v)
    return out


_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes, anything else stays."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _REF.sub(sub, value)


def service_env(services: list[dict]) -> dict[str, str]:
    """The Docker-links-style variables of enableServiceLinks, for Services with a cluster IP."""
    env: dict[str, str] = {}
    for svc in services:
        ip = (svc.get("spec") or {}).get("clusterIP")
        ports = (svc.get("spec") or {}).get("ports") or []
        if not ip or ip == "None" or not ports:
            continue
        prefix = svc["metadata"]["name"].upper().replace("-", "_")
        env[f"{prefix}_SERVICE_HOST"] = ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for p in ports:
            proto = p.get("protocol", "TCP")
            if p.get("name"):
                env[f"{prefix}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
            base = f"{prefix}_PORT_{p['port']}_{proto}"
            env[base] = f"{proto.lower()}://{ip}:{p['port']}"
            env[f"{base}_PROTO"] = proto.lower()
            env[f"{base}_PORT"] = str(p["port"])
            env[f"{base}_ADDR"] = ip
        env[f"{prefix}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"
    return env


def container_env(pod: dict, container: dict, image_env: dict[str, str], lookup: Lookup,
                  allocatable: dict[str, str], services: list[dict] | None = None) -> dict[str, str]:
    """The environment a container starts with: the image's, the pod's hostname, service links, envFrom,
    then env in order (each may refer to the ones before it)."""
    env = dict(image_env)
    env["HOSTNAME"] = hostname(pod)
    declared: dict[str, str] = {}
    if services:
        declared.update(service_env(services))
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = src.get(key)
            if not ref:
                continue
            obj = lookup(kind, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{"secret" if kind == "Secret" else "configmap"} "{ref["name"]}" not found')
            for k, v in decoded_data(obj).items():
                declared[prefix + k] = v.decode(errors="replace")
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            declared[name] = expand(var.get("value", ""), declared)
            continue
        src = var["valueFrom"]
        if "secretKeyRef" in src:
            value = _key_from(lookup, "Secret", src["secretKeyRef"])
        elif "configMapKeyRef" in src:
            value = _key_from(lookup, "ConfigMap", src["configMapKeyRef"])
        elif "fieldRef" in src:
            value = field_value(pod, src["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in src:
            ref = src["resourceFieldRef"]
            target = container
            if ref.get("containerName") and ref["containerName"] != container["name"]:
                target = next((c for c in all_containers(pod) if c["name"] == ref["containerName"]), None)
                if target is None:
                    raise ConfigError(f"resourceFieldRef: no container {ref['containerName']!r}")
            value = resource_value(target, ref, allocatable)
        else:
            raise ConfigError(f"env {name}: valueFrom {sorted(src)} is not supported")
        if value is not None:
            declared[name] = value
    env.update(declared)
    return env


def all_containers(pod: dict) -> list[dict]:
    spec = pod.get("spec") or {}
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def hostname(pod: dict) -> str:
    spec = pod.get("spec") or {}
    return (spec.get("hostname") or pod["metadata"]["name"])[:63]


def command_line(container: dict, entrypoint: list[str], cmd: list[str], env: dict[str, str]) -> list[str]:
    """The argv a runtime runs: command replaces the image's ENTRYPOINT (and drops its CMD), args replace CMD;
    $(VAR) references are expanded from the container's env."""
    command = container.get("command")
    args = container.get("args")
    if command is not None:
        argv = list(command) + list(args or [])
    else:
        argv = list(entrypoint) + (list(args) if args is not None else list(cmd))
    return [expand(a, env) for a in argv]


def probe_port(container: dict, port: Any) -> int:
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ConfigError(f"probe port {port!r} is not a port of container {container['name']}")


def user_of(pod: dict, container: dict, image_user: str | None) -> tuple[int, int, list[int]]:
    """uid, gid and supplementary groups: the container's securityContext over the pod's over the image's
    USER; fsGroup and supplementalGroups join the groups."""
    psc = (pod.get("spec") or {}).get("securityContext") or {}
    csc = container.get("securityContext") or {}
    image_uid, image_gid = 0, 0
    if image_user:
        u, _, g = image_user.partition(":")
        image_uid = int(u) if u.isdigit() else 0
        image_gid = int(g) if g.isdigit() else image_uid
    uid = csc.get("runAsUser", psc.get("runAsUser", image_uid))
    gid = csc.get("runAsGroup", psc.get("runAsGroup", image_gid))
    if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) and int(uid) == 0:
        raise ConfigError("container has runAsNonRoot and image will run as root")
    groups = list(psc.get("supplementalGroups") or [])
    if psc.get("fsGroup") is not None:
        groups.append(psc["fsGroup"])
    return int(uid), int(gid), sorted(set(groups))


def backoff_seconds(restarts: int) -> float:
    """The kubelet's crash back-off before restart number `restarts` (counting from 1): none for the first,
    then 10s doubling to 5 minutes."""
    if restarts <= 1:
        return 0.0
    return float(min(300, 10 * 2 ** (restarts - 2)))


def should_restart(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def termination_message(file_text: str, log_tail: str, policy: str, exit_code: int) -> str:
    """What the kubelet keeps as the termination message: the file (up to 4096 bytes), or with
    FallbackToLogsOnError and a failure and an empty file, the last 80 lines / 2048 bytes of the log."""
    msg = file_text[:4096]
    if not msg.strip() and policy == "FallbackToLogsOnError" and exit_code != 0:
        lines = log_tail.splitlines()[-80:]
        msg = "\n".join(lines)
        msg = msg.encode()[-2048:].decode(errors="ignore")
        if msg and not msg.endswith("\n") and log_tail.endswith("\n"):
            msg += "\n"
    return msg


def pod_phase(policy: str, states: list[str], exit_codes: list[int | None], restarting: list[bool]) -> str:
    """The kubelet's phase from its containers: states are waiting|running|terminated per container."""
    if any(s == "waiting" and not r for s, r in zip(states, restarting)):
        return "Pending"
    if any(s == "running" for s in states) or any(restarting):
        return "Running"
    if all(s == "terminated" for s in states):
        if policy == "Always":
            return "Running"
        return "Failed" if any(c != 0 for c in exit_codes) else "Succeeded"
    return "Pending"
