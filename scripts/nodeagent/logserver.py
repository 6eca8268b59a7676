"""The kubelet's container-log endpoint, so `kubectl logs` (and anything reading pods/log through the API
server) sees what a process node's containers wrote: GET /containerLogs/{namespace}/{pod}/{container} with
tailLines, limitBytes, previous and follow. HTTPS with a certificate from the cluster's CA; only the API
server's kubelet-client certificate is let in."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from .agent import Agent


def _tls(pki: Path, host_ip: str, folder: Path) -> ssl.SSLContext:
    """A serving certificate for the node address, signed by the cluster CA; clients must show a CA-signed one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "process-node-kubelet")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host_ip))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kubelet.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                                           serialization.NoEncryption()))
    (folder / "kubelet.key").chmod(0o600)
    (folder / "kubelet.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(folder / "kubelet.crt"), str(folder / "kubelet.key"))
    ctx.load_verify_locations(str(pki / "ca.crt"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "process-node"

    def log_message(self, *args) -> None:
        pass

    def _text(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        agent: Agent = self.server.agent  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            return self._text(200, "ok")
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self._text(404, f"{url.path}: a process node serves containerLogs only")
        _, namespace, pod, name = parts
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        worker = agent.find(namespace, pod)
        if worker is None:
            return self._text(404, f'pod "{pod}" in namespace "{namespace}" is not on this node')
        container = next((c for c in worker.init_containers + worker.containers if c.name == name), None)
        if container is None:
            return self._text(404, f'container "{name}" is not in pod "{pod}"')
        inst = container.instance
        if inst is None:
            reason = container.waiting[0]
            return self._text(400, f'container "{name}" in pod "{pod}" is waiting to start: {reason}')
        number = inst.number
        if q.get("previous") in ("true", "1"):
            if not container.last_terminated:
                return self._text(400, f'previous terminated container "{name}" in pod "{pod}" not found')
            number -= 1
            inst = None
        path = worker.log_path(name, number)
        data = path.read_bytes() if path.exists() else b""
        if "tailLines" in q:
            n = int(q["tailLines"])
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-n:]) if n > 0 else b""
        if "limitBytes" in q:
            data = data[: int(q["limitBytes"])]
        follow = q.get("follow") in ("true", "1") and inst is not None
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        if not follow:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        offset = path.stat().st_size if path.exists() else 0

        def chunk(b: bytes) -> None:
            if b:
                self.wfile.write(f"{len(b):x}\r\n".encode() + b + b"\r\n")
                self.wfile.flush()

        try:
            chunk(data)
            while True:
                done = inst.done.is_set()
                with open(path, "rb") as f:
                    f.seek(offset)
                    more = f.read()
                offset += len(more)
                chunk(more)
                if done or agent.stopping:
                    break
                time.sleep(0.2)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass


class LogServer:
    def __init__(self, agent: "Agent", host_ip: str, pki: Path | None) -> None:
        self.httpd = ThreadingHTTPServer((host_ip, 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.agent = agent  # type: ignore[attr-defined]
        if pki is not None:
            ctx = _tls(pki, host_ip, agent.state / "pki")
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="log-server")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
