#!/usr/bin/env python3
"""Resident memory per idle connection through a keycard pair, per sidecar, three ways in one run:
over mutual TLS kept by rustls (`rustls`: `tls.user_records: off`), over mutual TLS with keycard's
own record layer (`mtls`, the default where the kernel has no TLS), and with plaintext legs spliced
both ways (`plain`:
PeerAuthentication DISABLE, DestinationRule tls DISABLE). A kernel-TLS connection keeps what a
plaintext one keeps once the kernel has its records (plus the kernel's own memory, which RSS does
not show), so `plain` is what kernel TLS would leave per connection on a machine whose kernel has
no `tls` module to measure it with (bench/vm-ktls.sh measures kernel TLS itself, emulated).

Usage: python3 bench/idle-split.py [CONNECTIONS]     (default 5000; after bench/run has built
       target/x86_64-unknown-linux-musl/release/keycard and target/release/keycard-bench)

Everything listens on 127.0.0.1; every connection makes one 1 KiB request, then is held; the
sidecars' VmRSS growth divided by the count is the figure.
"""
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYCARD = os.path.join(ROOT, "target/x86_64-unknown-linux-musl/release/keycard")
BENCH = os.path.join(ROOT, "target/release/keycard-bench")

STRICT = """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""
PLAIN = """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: DISABLE}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: plain, namespace: bench}
spec:
  host: server.bench.svc.cluster.local
  trafficPolicy: {tls: {mode: DISABLE}}
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def sidecar_yaml(work, sa, body, tls=""):
    certs = os.path.join(work, "certs", sa)
    p = [free_port() for _ in range(3)]
    return f"""workload: {{trust_domain: cluster.local, namespace: bench, service_account: {sa}}}
identity:
  files: {{cert: {certs}/cert.pem, key: {certs}/key.pem, bundle: {certs}/bundle.pem}}
{body}{tls}policy: {{paths: [policies.yaml]}}
admin: 127.0.0.1:{p[0]}
metrics: 127.0.0.1:{p[1]}
readiness: 127.0.0.1:{p[2]}
"""


def measure(work, mode, count):
    d = os.path.join(work, mode)
    os.makedirs(d)
    with open(os.path.join(d, "policies.yaml"), "w") as f:
        f.write(PLAIN if mode == "plain" else STRICT)
    tls = "tls: {user_records: off}\n" if mode == "rustls" else ""
    app, inbound, outbound = free_port(), free_port(), free_port()
    with open(os.path.join(d, "inbound.yaml"), "w") as f:
        f.write(sidecar_yaml(work, "server", f"inbound:\n  - {{port: 8080, listen: 127.0.0.1:{inbound}, app: 127.0.0.1:{app}, protocol: tcp}}\n", tls))
    with open(os.path.join(d, "outbound.yaml"), "w") as f:
        f.write(sidecar_yaml(work, "client", f"outbound:\n  - {{listen: 127.0.0.1:{outbound}, remote: 127.0.0.1:{inbound}, host: server.bench.svc.cluster.local, identities: [spiffe://cluster.local/ns/bench/sa/server], protocol: tcp}}\n", tls))
    procs = [subprocess.Popen([BENCH, "backend", "--listen", f"127.0.0.1:{app}"], stderr=subprocess.DEVNULL)]
    try:
        for name in ("inbound", "outbound"):
            log = open(os.path.join(d, f"{name}.log"), "w")
            procs.append(subprocess.Popen([KEYCARD, "proxy", "--config", os.path.join(d, f"{name}.yaml")], stderr=log))
        time.sleep(1.5)
        before = [rss_kib(p.pid) for p in procs[1:]]
        held = []
        request = b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n"
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", outbound), timeout=10)
            s.sendall(request)
            got = b""
            while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 1024:
                chunk = s.recv(65536)
                if not chunk:
                    raise SystemExit(f"{mode}: connection {i} closed early")
                got += chunk
            held.append(s)
        time.sleep(1)
        after = [rss_kib(p.pid) for p in procs[1:]]
        return [(a - b) / count for a, b in zip(after, before)]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = min(count, hard - 500)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="keycard-idle-") as work:
        ca = os.path.join(work, "ca")
        subprocess.run([KEYCARD, "ca", "init", "--dir", ca, "--trust-domain", "cluster.local"], check=True, capture_output=True)
        for sa in ("server", "client"):
            out = os.path.join(work, "certs", sa)
            subprocess.run([KEYCARD, "ca", "issue", "--dir", ca, "--ns", "bench", "--sa", sa, "--out", out], check=True, capture_output=True)
        print(f"{count} idle connections, KiB of resident memory per connection")
        print("| legs | inbound sidecar | outbound sidecar |")
        print("|---|---|---|")
        modes = (
            ("rustls", "mutual TLS, rustls (`tls.user_records: off`)"),
            ("mtls", "mutual TLS, keycard's record layer"),
            ("plain", "plaintext, spliced (what kernel TLS keeps)"),
        )
        for mode, label in modes:
            inbound, outbound = measure(work, mode, count)
            print(f"| {label} | {inbound:.2f} | {outbound:.2f} |")


if __name__ == "__main__":
    main()
