"""python -m nodeagent --kubeconfig K --state DIR --node NAME [--node NAME ...] [--taint k=v:Effect] ..."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from .agent import Agent


def _taint(text: str) -> dict:
    kv, _, effect = text.rpartition(":")
    key, _, value = kv.partition("=")
    if not key or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected key[=value]:NoSchedule|PreferNoSchedule|NoExecute")
    return {"key": key, "effect": effect, **({"value": value} if value else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nodeagent", description=__doc__)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--state", required=True, type=Path, help="folder for pods' files, logs and volumes")
    p.add_argument("--node", action="append", required=True, help="a node to register (repeat for more)")
    p.add_argument("--taint", action="append", type=_taint, default=[], help="key[=value]:Effect on every node")
    p.add_argument("--label", action="append", default=[], help="key=value on every node")
    p.add_argument("--pki", type=Path, help="the cluster CA folder (ca.crt, ca.key): serve container logs over TLS")
    p.add_argument("--kubelet-version", default="v1.37.2")
    p.add_argument("--cpu", help="CPU capacity to report (default: this machine's)")
    p.add_argument("--memory", help="memory capacity to report (default: this machine's)")
    p.add_argument("--ready-file", type=Path, help="written (JSON) once the nodes are registered")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    labels = dict(item.split("=", 1) for item in args.label)
    agent = Agent(args.kubeconfig, args.state, args.node, labels=labels, taints=args.taint,
                  version=args.kubelet_version, pki=args.pki, cpu=args.cpu, memory=args.memory)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent.start()
    except Exception as exc:  # noqa: BLE001
        logging.getLogger("nodeagent").error("cannot start: %s", exc)
        agent.stop()
        return 1
    if args.ready_file:
        args.ready_file.write_text(json.dumps({"hostIP": agent.network.host_ip, "subnet": str(agent.network.subnet),
                                               "bridge": agent.network.bridge, "nodes": args.node,
                                               "logPort": agent.log_server.port, "cgroups": agent.cgroups.mode}))
    stop.wait()
    logging.getLogger("nodeagent").info("stopping")
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
