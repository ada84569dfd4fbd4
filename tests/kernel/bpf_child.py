"""Child programs for the BPF kernel tests (stdlib only: run by copies of the interpreter).

Each mode prints JSON lines on stdout: what the kernel told this process, never what the
test expects. Modes:

- ``marks``: at once, before anything else, one socket of each kind (TCP/UDP x v4/v6); prints
  ``{"pid", "marks": {kind: SO_MARK}}``, then waits for a line on stdin (so the test can look
  at the membership map while it lives).
- ``thread-marks``: start a thread, let it exit, then as ``marks`` (a thread's exit must not
  end the process's membership).
- ``detach OUT [FIFO]``: fork, setsid, fork again; the grandchild (its parent is gone) makes
  a UDP socket and writes ``{"pid", "ppid", "mark"}`` to OUT; with FIFO it then lives until
  the test opens and closes FIFO for writing (so the test can read its membership).
- ``spawn ARGV...``: fork, the child execs ARGV (the path as given); print
  ``{"pid", "child"}``, wait for the child, print ``{"exited": child}``, then wait for a line
  on stdin (or its end).
- ``udp FAMILY SRC DST PORT`` / ``tcp FAMILY SRC DST PORT``: bind a socket to SRC, print
  ``{"port"}``; then for each stdin line send it (UDP) or connect and send an HTTP request
  (TCP, 1 s timeout), printing ``{"sent"}`` or ``{"error"}``. With ``EM_CLEAR_MARK=1`` in
  the environment each socket first sets its ``SO_MARK`` to 0 (as a root build could).
"""

from __future__ import annotations

import json
import os
import socket
import sys

KINDS = {"tcp4": (socket.AF_INET, socket.SOCK_STREAM), "udp4": (socket.AF_INET, socket.SOCK_DGRAM),
         "tcp6": (socket.AF_INET6, socket.SOCK_STREAM),
         "udp6": (socket.AF_INET6, socket.SOCK_DGRAM)}


def say(obj: object) -> None:
    print(json.dumps(obj), flush=True)


def mark(s: socket.socket) -> int:
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) & 0xFFFFFFFF


def marks() -> None:
    socks = {k: socket.socket(*v) for k, v in KINDS.items()}
    say({"pid": os.getpid(), "marks": {k: mark(s) for k, s in socks.items()}})
    sys.stdin.readline()


def detach(out: str, fifo: str | None) -> None:
    if os.fork():
        os.wait()
        return
    os.setsid()
    middle = os.getpid()
    if os.fork():
        os._exit(0)
    # The grandchild: wait until its parent has exited and it was reparented away.
    while os.getppid() == middle:
        os.sched_yield()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "ppid": os.getppid(), "mark": mark(s)}, f)
    os.rename(tmp, out)
    if fifo:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # let go of the pipes cargo reads a build script's output from
            os.dup2(null, fd)
        with open(fifo) as f:
            f.read()
    os._exit(0)


def spawn(argv: list[str]) -> None:
    child = os.fork()
    if child == 0:
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    say({"pid": os.getpid(), "child": child})
    os.waitpid(child, 0)
    say({"exited": child})
    sys.stdin.readline()


def send(proto: str, family: str, src: str, dst: str, port: int) -> None:
    fam = socket.AF_INET if family == "4" else socket.AF_INET6
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    s = socket.socket(fam, kind)
    first_mark = mark(s)
    clear = os.environ.get("EM_CLEAR_MARK") == "1"
    if clear:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((src, 0))
    local = s.getsockname()[1]
    say({"port": local, "mark": first_mark, "now": mark(s)})
    for line in sys.stdin:
        body = line.strip()
        try:
            if proto == "udp":
                s.sendto(body.encode(), (dst, port))
            else:  # each attempt from a new socket on the same local port (same flow key)
                s.close()
                s = socket.socket(fam, kind)
                if clear:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((src, local))
                s.settimeout(1.0)
                s.connect((dst, port))
                s.sendall(f"POST /{body} HTTP/1.0\r\nContent-Length: 0\r\n\r\n".encode())
                s.recv(100)
            say({"sent": body})
        except OSError as e:
            say({"error": str(e)})


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "marks":
        marks()
    elif mode == "thread-marks":
        import threading
        t = threading.Thread(target=os.getpid)
        t.start()
        t.join()
        marks()
    elif mode == "spawn":
        spawn(sys.argv[2:])
    elif mode == "detach":
        detach(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        send(mode, sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
