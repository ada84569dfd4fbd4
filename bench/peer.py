"""The benchmark's peer in a network namespace: an accept-and-close port and a byte sink.

Port 9000 accepts and closes at once (connection latency); port 9001 reads until EOF and
answers the byte count (throughput); port 9002 reads one request and answers ``ok`` (a
request's round trip). Prints ``ready`` once all three listen.
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
    buf = bytearray(1 << 20)  # read into one buffer: no allocation per read
    while True:
        conn, _ = srv.accept()
        total = 0
        while n := conn.recv_into(buf):
            total += n
        conn.sendall(str(total).encode())
        conn.close()


def answer(srv: socket.socket) -> None:
    while True:
        conn, _ = srv.accept()
        if conn.recv(64):
            conn.sendall(b"ok")
        conn.close()


def main() -> None:
    addr = sys.argv[1]
    for port, fn in ((9000, accept_close), (9001, sink), (9002, answer)):
        srv = socket.create_server((addr, port), backlog=512)
        threading.Thread(target=fn, args=(srv,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
