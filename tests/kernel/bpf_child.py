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
  With ``EM_FORGE=setsockopt`` or ``EM_FORGE=cmsg`` and ``EM_FORGE_TAG=T``, a line starting
  with ``forged`` is sent under the mark ``T | parent's pid`` (the stamp of the cargo that ran
  this process), set with ``SO_MARK`` on the socket or, for ``cmsg`` (UDP), per datagram in a
  ``SO_MARK`` control message; any other line under the socket's own stamp again. Each
  ``{"sent"}`` then also says the ``mark`` asked for.
- ``clone-at TID ARGV...``: create a child with exactly the pid TID (``clone3`` with
  ``set_tid``: the test reuses an exited process's pid), which execs ARGV; wait for it and
  print ``{"pid", "child"}`` (or ``{"error"}``).
- ``sockopt TAG``: on a new UDP socket, try ``SO_MARK`` = ``TAG | parent's pid`` (forged) and
  ``SO_MARK`` = 0 (clear), then ``SO_RCVBUF`` with an optval of two pages (the kernel reads
  the first int); print ``{"pid", "mark", "forged", "clear", "rcvbuf", "now"}`` (``"ok"`` or
  the errno for each ``SO_MARK``, the buffer size read back, the mark after).
"""

from __future__ import annotations

import json
import os
import socket
import struct
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
    forge = os.environ.get("EM_FORGE", "")
    forged_mark = int(os.environ.get("EM_FORGE_TAG", "0"), 0) | os.getppid()
    if clear:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((src, 0))
    local = s.getsockname()[1]
    say({"port": local, "mark": first_mark, "now": mark(s), "forged_mark": forged_mark})
    for line in sys.stdin:
        body = line.strip()
        want = forged_mark if forge and body.startswith("forged") else first_mark
        try:
            if proto == "udp":
                if forge == "cmsg" and want == forged_mark:
                    s.sendmsg([body.encode()], [(socket.SOL_SOCKET, socket.SO_MARK,
                                                 struct.pack("=I", want))], 0, (dst, port))
                else:
                    if forge == "setsockopt":
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("=I", want))
                    s.sendto(body.encode(), (dst, port))
            else:  # each attempt from a new socket on the same local port (same flow key)
                s.close()
                s = socket.socket(fam, kind)
                if clear:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0)
                if forge == "setsockopt" and want == forged_mark:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("=I", want))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((src, local))
                s.settimeout(1.0)
                s.connect((dst, port))
                s.sendall(f"POST /{body} HTTP/1.0\r\nContent-Length: 0\r\n\r\n".encode())
                s.recv(100)
            say({"sent": body, "mark": want} if forge else {"sent": body})
        except OSError as e:
            say({"error": str(e)})


def clone_at(tid: int, argv: list[str]) -> None:
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    tids = (ctypes.c_int * 1)(tid)
    # struct clone_args up to set_tid_size (CLONE_ARGS_SIZE_VER1): a plain fork otherwise.
    args = ctypes.create_string_buffer(struct.pack(
        "=10Q", 0, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, ctypes.addressof(tids), 1))
    c_argv = (ctypes.c_char_p * (len(argv) + 1))(*[a.encode() for a in argv], None)
    pid = libc.syscall(435, args, 80)  # SYS_clone3 (x86_64 and aarch64)
    if pid == 0:  # the child: straight to exec, nothing else of the interpreter runs
        libc.execv(c_argv[0], c_argv)
        libc._exit(127)
    if pid < 0:
        say({"error": os.strerror(ctypes.get_errno())})
        return
    os.waitpid(pid, 0)
    say({"pid": os.getpid(), "child": pid})


def sockopt(tag: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out: dict[str, object] = {"pid": os.getpid(), "mark": mark(s)}
    for name, value in (("forged", tag | os.getppid()), ("clear", 0)):
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("=I", value))
            out[name] = "ok"
        except OSError as e:
            out[name] = e.errno
    large = struct.pack("=i", 65536).ljust(2 * os.sysconf("SC_PAGE_SIZE"), b"\0")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, large)
    out["rcvbuf"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    out["now"] = mark(s)
    say(out)


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
    elif mode == "clone-at":
        clone_at(int(sys.argv[2]), sys.argv[3:])
    elif mode == "sockopt":
        sockopt(int(sys.argv[2], 0))
    elif mode == "spawn":
        spawn(sys.argv[2:])
    elif mode == "detach":
        detach(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        send(mode, sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
