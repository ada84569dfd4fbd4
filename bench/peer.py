"""The benchmark's peer in a network namespace: an accept-and-close port and a byte sink.

Port 9000 accepts and closes at once (connection latency); port 9001 reads until EOF and
answers the byte count (throughput). Prints ``ready`` once both listen.
"""

from __future__ import annotations

import socket
import sys
import threading


def accept_close(srv: socket.socket) -> None:
    while True:
        conn, _ = srv.accept()
        conn.close()


def sink(srv: socket.socket) -> None:
    while True:
        conn, _ = srv.accept()
        total = 0
        while chunk := conn.recv(1 << 20):
            total += len(chunk)
        conn.sendall(str(total).encode())
        conn.close()


def main() -> None:
    addr = sys.argv[1]
    for port, fn in ((9000, accept_close), (9001, sink)):
        srv = socket.create_server((addr, port), backlog=512)
        threading.Thread(target=fn, args=(srv,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
