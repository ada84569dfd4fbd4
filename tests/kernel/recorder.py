"""A test host's server: records every HTTP request (TCP) and UDP datagram it receives.

Run inside the test's network namespace. Listens on HTTP port 8080 and UDP port 5353 (each
datagram is echoed back) on both families, and on raw TCP port 8443 (IPv4) with TCP Fast Open
accepted without a cookie (the namespace's own ``tcp_fastopen`` sysctl): each connection's
bytes are recorded with whether they came in the SYN. Appends one JSON line per request,
datagram or raw connection to ``--out``, and prints ``ready`` once every socket is bound, so
the test can wait for it.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_lock = threading.Lock()


def record(out: str, entry: dict[str, object]) -> None:
    with _lock, open(out, "a") as f:
        f.write(json.dumps(entry) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--v4", required=True)
    ap.add_argument("--v6", required=True)
    ap.add_argument("--static", help="serve GET /reg/<path> from this directory")
    args = ap.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            if self.command == "GET" and args.static and self.path.startswith("/reg/"):
                self._static()
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            record(args.out, {"proto": "tcp", "method": self.command, "path": self.path,
                              "peer": self.client_address[0], "body_len": len(body),
                              "body": body.decode("utf-8", "replace")})
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def _static(self) -> None:
            rel = os.path.normpath(self.path[len("/reg/"):].split("?")[0]).lstrip("/")
            path = os.path.join(args.static, rel)
            ok = not rel.startswith("..") and os.path.isfile(path)
            record(args.out, {"proto": "tcp", "method": "GET", "path": self.path,
                              "peer": self.client_address[0], "body_len": 0, "body": "",
                              "status": 200 if ok else 404})
            data = b"not found"
            if ok:
                with open(path, "rb") as f:
                    data = f.read()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _handle

        def log_message(self, *_args: object) -> None:
            pass

    class V6Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    def raw_server() -> None:
        while True:
            conn, peer = raw.accept()
            # tcpi_options is byte 5 of struct tcp_info; TCPI_OPT_SYN_DATA = 32
            info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
            conn.settimeout(2)
            data = b""
            try:
                while chunk := conn.recv(65536):
                    data += chunk
                    if b"\r\n\r\n" in data or len(data) > 100_000:
                        break
                conn.sendall(b"ok")
            except OSError:
                pass
            conn.close()
            record(args.out, {"proto": "raw", "peer": peer[0], "syn_data": bool(info[5] & 32),
                              "body_len": len(data), "body": data.decode("utf-8", "replace")})

    with open("/proc/sys/net/ipv4/tcp_fastopen", "w") as f:  # this namespace's own
        f.write(str(0x1 | 0x2 | 0x200))  # client, server, server without a cookie
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    raw.bind((args.v4, 8443))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
    raw.listen(16)
    threading.Thread(target=raw_server, daemon=True).start()
    servers = [ThreadingHTTPServer((args.v4, 8080), Handler), V6Server((args.v6, 8080), Handler)]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    sel = selectors.DefaultSelector()
    for family, addr in ((socket.AF_INET, args.v4), (socket.AF_INET6, args.v6)):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((addr, 5353))
        sel.register(udp, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data, peer = sock.recvfrom(65535)
            sock.sendto(data, peer)  # the echo lets the sender wait for its verdict
            record(args.out, {"proto": "udp", "peer": peer[0], "body": data.decode("utf-8",
                                                                                   "replace")})


if __name__ == "__main__":
    main()
