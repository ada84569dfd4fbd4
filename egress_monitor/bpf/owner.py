"""The one owner of the daemon's BPF objects: loads, attaches, serves the maps, tears down.

``BpfOwner.open()`` reads the kernel's BTF, creates the maps, loads the programs
(``programs.py``), attaches ``sock_create`` and the backstop at the cgroup2 root with
``BPF_F_ALLOW_MULTI`` (beside anyone else's programs) and opens the three raw tracepoints. Any
failure undoes what was done and raises :class:`BpfUnavailable` with what is missing. The
two Unix socket hooks of ``engines.py`` are optional: when they cannot load (a kernel older
than 6.7), ``engine_error`` says why and the rest stands. The ``SO_MARK`` guard
(``em_sockopt``) is optional too: if this kernel cannot load or attach it, the owner opens
without it and says why in :attr:`BpfOwner.degraded` (the backstop's stamp check holds
without it). :meth:`close` detaches and closes everything, each step on its own, so it is
safe from a ``finally`` at any point. The tracepoints go with their descriptors; the cgroup
programs are held by the cgroup (``BPF_PROG_ATTACH``) and outlive a daemon killed outright
until the next :meth:`open` or ``egress-monitor cleanup`` detaches them (:func:`detach_stale`).

Use one owner per daemon, from one thread; the map methods are plain syscalls.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from egress_monitor.bpf import engines, fast, hostmarks, programs
from egress_monitor.bpf import syscalls as sys
from egress_monitor.bpf.btf import Btf, BtfError, int_types_blob, load_vmlinux
from egress_monitor.bpf.engines import EngineFds, Hit, parse_hit
from egress_monitor.bpf.execs import ExecRecord, parse_exec_record
from egress_monitor.bpf.marks import MarkLayout, MarkLayoutError
from egress_monitor.bpf.programs import MapFds, Offsets

# Our cgroup programs: attached with BPF_PROG_ATTACH they outlive a daemon killed outright
# (the cgroup holds them), which keeps a dead daemon's members refused in the kernel (closed)
# until the next daemon, or `egress-monitor cleanup`, takes them off.
CGROUP_PROGRAMS = (("em_sock_create", sys.ATTACH_CGROUP_INET_SOCK_CREATE),
                   ("em_backstop", sys.ATTACH_CGROUP_INET_EGRESS),
                   *((name, attach) for name, attach, _dgram in engines.HOOKS),
                   ("em_sockopt", sys.ATTACH_CGROUP_SETSOCKOPT),
                   ("em_connect4", sys.ATTACH_CGROUP_INET4_CONNECT),
                   ("em_connect6", sys.ATTACH_CGROUP_INET6_CONNECT))


def detach_stale(cgroup_fd: int, keep: frozenset[int] | set[int] = frozenset()) -> int:
    """Detach every program of ours (by name) from the cgroup but those in ``keep``; returns
    how many. Errors on one program do not stop the others."""
    done = 0
    for name, attach in CGROUP_PROGRAMS:
        try:
            attached = sys.prog_query(cgroup_fd, attach)
        except OSError:
            continue
        for prog_id in attached:
            if prog_id in keep:
                continue
            try:
                fd = sys.prog_fd_by_id(prog_id)
            except OSError:
                continue
            try:
                if sys.prog_name(fd) == name:
                    sys.prog_detach(cgroup_fd, fd, attach)
                    done += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return done


def detach_stale_at(cgroup_root: str) -> int:
    """:func:`detach_stale` for a cgroup path (``egress-monitor cleanup``); 0 if it cannot
    be opened."""
    try:
        cg = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return 0
    try:
        return detach_stale(cg)
    finally:
        os.close(cg)


class BpfUnavailable(RuntimeError):
    """The kernel cannot run the programs; the message says what is missing."""


@dataclass
class BpfOwner:
    layout: MarkLayout
    cgroup_root: str
    fds: MapFds | None = None
    _maps: list[int] = field(default_factory=list)
    _progs: dict[str, int] = field(default_factory=dict)
    _links: list[int] = field(default_factory=list)
    _attached: list[tuple[int, int, int]] = field(default_factory=list)  # cgroup, prog, type
    prog_ids: dict[str, int] = field(default_factory=dict)
    map_ids: list[int] = field(default_factory=list)
    detached_stale: int = 0  # a dead daemon's programs taken off the root at open
    # The container-engine hooks (engines.py) are optional: without BPF LSM the rest runs
    # and this says why they are missing.
    engine_fds: EngineFds | None = None
    engine_error: str | None = None
    degraded: dict[str, str] = field(default_factory=dict)  # optional program -> why not

    @classmethod
    def open(cls, layout: MarkLayout, cgroup_root: str, pid_max: int | None = None) -> BpfOwner:
        """Load and attach everything, or raise having undone it: :class:`BpfUnavailable`
        (the kernel lacks something; the message says what) or
        :class:`~egress_monitor.bpf.hostmarks.MarkConflict` (the host uses our mark bits)."""
        if pid_max is None:
            pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        try:
            layout.validate(pid_max)
        except MarkLayoutError as e:
            raise BpfUnavailable(f"mark layout: {e}") from None
        hostmarks.check(layout)
        owner = cls(layout, cgroup_root)
        try:
            owner._load()
        except BaseException:
            owner.close()
            raise
        return owner

    @staticmethod
    @contextlib.contextmanager
    def _step(what: str) -> Iterator[None]:
        """Turn a bpf(2) failure into :class:`BpfUnavailable` naming the step."""
        try:
            yield
        except sys.BpfError as e:
            raise BpfUnavailable(f"{what}: {e}") from None

    def _load(self) -> None:
        try:
            vmlinux = load_vmlinux()
            offsets = Offsets.from_btf(vmlinux)
        except BtfError as e:
            raise BpfUnavailable(f"kernel BTF: {e}") from None
        P = programs

        def mk(kind: int, key: int, value: int, entries: int, name: str, flags: int = 0,
               btf: tuple[int, int, int] | None = None) -> int:
            with self._step(f"creating map {name}"):
                fd = sys.map_create(kind, key, value, entries, name, flags, btf)
                self._maps.append(fd)
                self.map_ids.append(sys.obj_id(fd))
            return fd

        with self._step("loading BTF for socket storage"):
            btf_fd = sys.btf_load(int_types_blob())
        self._links.append(btf_fd)
        self.fds = fds = MapFds(
            mk(sys.MAP_HASH, P.MEMBER_KEY, P.MEMBER_VALUE, P.MEMBERS_MAX, "em_members"),
            mk(sys.MAP_HASH, P.FILE_KEY, 4, P.TOOLCHAIN_MAX, "em_toolchain"),
            mk(sys.MAP_LRU_HASH, P.FLOW_KEY, 8, P.VERDICTS_MAX, "em_verdicts"),
            mk(sys.MAP_ARRAY, 4, 8, len(P.STATS), "em_stats"),
            mk(sys.MAP_SK_STORAGE, 4, fast.SOCKET_VALUE, 0, "em_sockets", sys.F_NO_PREALLOC,
               (btf_fd, 1, 3)),
            mk(sys.MAP_LRU_HASH, P.MEMBER_KEY, P.EXEC_RECORD.size, P.EXECS_MAX, "em_execs"),
            mk(sys.MAP_PERCPU_ARRAY, 4, P.EXEC_RECORD.size, 1, "em_exec_scratch"),
            mk(sys.MAP_LRU_HASH, 8, 4, P.NETNS_MAX, "em_netns"),
            mk(sys.MAP_LRU_HASH, fast.FAST_KEY, 8, fast.FAST_MAX, "em_fast"),
            mk(sys.MAP_HASH, 8, 8, P.CGROUPS_MAX, "em_cgroups"),
            mk(sys.MAP_ARRAY, 4, 8, 1, "em_lease"))
        specs = [
            ("em_fork", sys.PROG_RAW_TRACEPOINT, P.fork_program(fds, offsets), 0),
            ("em_exec", sys.PROG_RAW_TRACEPOINT, P.exec_program(fds, offsets), 0),
            ("em_exit", sys.PROG_RAW_TRACEPOINT, P.exit_program(fds, offsets), 0),
            ("em_sock_create", sys.PROG_CGROUP_SOCK, P.sock_create_program(fds, self.layout),
             sys.ATTACH_CGROUP_INET_SOCK_CREATE),
            ("em_backstop", sys.PROG_CGROUP_SKB, P.backstop_program(fds, self.layout),
             sys.ATTACH_CGROUP_INET_EGRESS),
        ]
        for name, kind, code, attach in specs:
            with self._step(f"loading {name}"):
                fd = sys.prog_load(kind, code, name, attach)
                self._progs[name] = fd
                self.prog_ids[name] = sys.obj_id(fd)
        # Membership first, then stamping, then the backstop: each relies on the one before.
        for name, tp in (("em_fork", "sched_process_fork"), ("em_exec", "sched_process_exec"),
                         ("em_exit", "sched_process_exit")):
            with self._step(f"attaching {name} to raw tracepoint {tp}"):
                self._links.append(sys.raw_tracepoint_open(tp, self._progs[name]))
        try:
            cg = os.open(self.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise BpfUnavailable(f"cannot open cgroup2 root {self.cgroup_root}: {e}") from None
        self._links.append(cg)
        for name, attach in (("em_sock_create", sys.ATTACH_CGROUP_INET_SOCK_CREATE),
                             ("em_backstop", sys.ATTACH_CGROUP_INET_EGRESS)):
            prog = self._progs[name]
            with self._step(f"attaching {name} to {self.cgroup_root}"):
                sys.prog_attach(cg, prog, attach)
            self._attached.append((cg, prog, attach))
        self._load_optional(cg, "em_sockopt", sys.PROG_CGROUP_SOCKOPT,
                            lambda: P.sockopt_program(fds, os.sysconf("SC_PAGE_SIZE")),
                            sys.ATTACH_CGROUP_SETSOCKOPT)
        if self.layout.fast:
            for family, name, attach in ((4, "em_connect4", sys.ATTACH_CGROUP_INET4_CONNECT),
                                         (6, "em_connect6", sys.ATTACH_CGROUP_INET6_CONNECT)):
                self._load_optional(cg, name, sys.PROG_CGROUP_SOCK_ADDR,
                                    functools.partial(fast.connect_program, fds.fast,
                                                      fds.sockets, fds.lease, self.layout,
                                                      family),
                                    attach)

        self._load_engines(vmlinux, fds, cg)
        self.detached_stale = detach_stale(cg, keep=set(self.prog_ids.values()))

    def _load_engines(self, vmlinux: Btf, fds: MapFds, cg: int) -> None:
        """The Unix socket hooks of ``engines.py``, or ``engine_error`` saying why not (what
        was made for them is closed again; the rest of the owner is untouched)."""
        made: list[int] = []
        attached: list[tuple[int, int, int]] = []
        try:
            try:
                ctx = engines.KernCtx.from_btf(vmlinux)
            except BtfError as e:
                raise BpfUnavailable(f"kernel BTF: {e}") from None

            def mk(kind: int, key: int, value: int, entries: int, name: str) -> int:
                with self._step(f"creating map {name}"):
                    made.append(sys.map_create(kind, key, value, entries, name))
                return made[-1]

            efds = EngineFds(fds.members, fds.stats,
                             mk(sys.MAP_HASH, engines.PATH_MAX, 4, engines.ENGINES_MAX,
                                "em_engine_paths"),
                             mk(sys.MAP_ARRAY, 4, 4, 1, "em_engine_conf"),
                             mk(sys.MAP_LRU_HASH, engines.HIT_KEY.size, engines.HIT.size,
                                engines.HITS_MAX, "em_engine_hits"))
            progs: dict[str, int] = {}
            for name, attach, datagram in engines.HOOKS:
                with self._step(f"loading {name}"):
                    progs[name] = sys.prog_load(sys.PROG_CGROUP_SOCK_ADDR,
                                                engines.unix_program(efds, ctx, datagram),
                                                name, attach)
                made.append(progs[name])
            for name, attach, _datagram in engines.HOOKS:
                with self._step(f"attaching {name} to {self.cgroup_root}"):
                    sys.prog_attach(cg, progs[name], attach)
                attached.append((cg, progs[name], attach))
        except BpfUnavailable as e:
            for cgfd, prog, attach in attached:
                with contextlib.suppress(OSError):
                    sys.prog_detach(cgfd, prog, attach)
            for fd in reversed(made):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.engine_error = str(e)
            return
        self._maps.extend(fd for fd in made if fd not in progs.values())
        for name, fd in progs.items():
            self._progs[name] = fd
            self.prog_ids[name] = sys.obj_id(fd)
        self._attached.extend(attached)
        self.engine_fds = efds
    def _load_optional(self, cg: int, name: str, kind: int, code: Callable[[], bytes],
                       attach: int) -> None:
        """Load and attach one program the daemon can run without; a failure is recorded in
        :attr:`degraded` (first line of the error: the verifier log is not for the log)."""
        try:
            fd = sys.prog_load(kind, code(), name, attach)
        except sys.BpfError as e:
            self.degraded[name] = f"cannot load: {str(e).splitlines()[0]}"
            return
        self._progs[name] = fd
        self.prog_ids[name] = sys.obj_id(fd)
        try:
            sys.prog_attach(cg, fd, attach)
        except sys.BpfError as e:
            self.degraded[name] = f"cannot attach to {self.cgroup_root}: {e}"
            del self._progs[name], self.prog_ids[name]
            os.close(fd)
            return
        self._attached.append((cg, fd, attach))

    def intact(self) -> list[str]:
        """What a root process has undone: one line per cgroup program no longer attached
        (empty: all in place). Cheap (one query per attach type): meant for every reconcile."""
        problems = []
        for cg, prog, attach in self._attached:
            name = next(n for n, fd in self._progs.items() if fd == prog)
            try:
                attached = sys.prog_query(cg, attach)
            except OSError as e:
                problems.append(f"{name}: cannot query {self.cgroup_root}: {e}")
                continue
            if self.prog_ids[name] not in attached:
                problems.append(f"{name} was detached from {self.cgroup_root}")
        return problems

    def reattach(self) -> list[str]:
        """Attach again each cgroup program someone detached; returns their names."""
        done = []
        for cg, prog, attach in self._attached:
            name = next(n for n, fd in self._progs.items() if fd == prog)
            try:
                if self.prog_ids[name] not in sys.prog_query(cg, attach):
                    sys.prog_attach(cg, prog, attach)
                    done.append(name)
            except OSError:
                continue
        return done

    def close(self, detach: bool = True) -> list[str]:
        """Detach and close everything; returns the errors met (each step is tried).

        ``detach=False`` leaves the cgroup programs attached (the cgroup holds them): a daemon
        stopping while builds still run keeps their unjudged packets dropped in the kernel
        until the next daemon's :meth:`open` (or ``cleanup``) takes them off."""
        errors = []
        if self.fds is not None:
            try:
                self.renew_ahead(0)  # whatever stays attached sends nothing ahead any more
            except OSError as e:
                errors.append(f"lease: {e}")
        if not detach:
            self._attached.clear()
        for cg, prog, attach in reversed(self._attached):
            try:
                sys.prog_detach(cg, prog, attach)
            except OSError as e:
                if e.errno != errno.ENOENT:  # ENOENT: someone detached it (intact() says so)
                    errors.append(f"detach: {e}")
        self._attached.clear()
        for fd in [*reversed(self._links), *self._progs.values(), *self._maps]:
            try:
                os.close(fd)
            except OSError as e:
                errors.append(f"close {fd}: {e}")
        self._links.clear()
        self._progs.clear()
        self._maps.clear()
        self.fds = None
        self.engine_fds = None
        return errors

    def __enter__(self) -> BpfOwner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Map access (userspace's side of each map's contract in programs.py).
    def _fds(self) -> MapFds:
        if self.fds is None:
            raise BpfUnavailable("the BPF owner is closed")
        return self.fds

    def add_toolchain_file(self, path: str, kind: int) -> None:
        """Register a file by identity (inode: hard links too, copies not) as ``kind``
        (``programs.FILE_*``; see ``exec_program`` for what each does). ``FILE_RUNNER`` is
        written as ``FILE_CARGO``: the kernel treats a build-script runner as cargo."""
        st = os.stat(path)
        code = programs.FILE_CARGO if kind == programs.FILE_RUNNER else kind
        sys.map_update(self._fds().toolchain,
                       programs.file_key(programs.kernel_dev(st.st_dev), st.st_ino),
                       struct.pack("=I", code))

    def add_cargo_file(self, path: str) -> None:
        """Make an exec of this file by a non-member start a build (role cargo)."""
        self.add_toolchain_file(path, programs.FILE_CARGO)

    def set_member(self, tgid: int, value: int, only_new: bool = False) -> bool:
        """Make ``tgid`` a member (adoption, ``egress-monitor exec``): its later forks follow.
        With ``only_new``, an existing entry (the kernel's own) is left alone: False then."""
        try:
            sys.map_update(self._fds().members, struct.pack("=I", tgid),
                           struct.pack("=Q", value),
                           sys.UPDATE_NOEXIST if only_new else sys.UPDATE_ANY)
        except sys.BpfError as e:
            if only_new and e.errno == errno.EEXIST:
                return False
            raise
        return True

    def member(self, tgid: int) -> int | None:
        raw = sys.map_lookup(self._fds().members, struct.pack("=I", tgid), 8)
        return None if raw is None else int(struct.unpack("=Q", raw)[0])

    def members(self) -> dict[int, int]:
        items = sys.map_items(self._fds().members, 4, 8, programs.MEMBERS_MAX)
        return {struct.unpack("=I", key)[0]: struct.unpack("=Q", raw)[0] for key, raw in items}

    def remove_member(self, tgid: int) -> bool:
        return sys.map_delete(self._fds().members, struct.pack("=I", tgid))

    def exec_record(self, tgid: int) -> ExecRecord | None:
        """What ``em_exec`` decided at ``tgid``'s latest exec as a member (or the exec that
        started its build), even after the process exited; None when there is none (never
        a member exec, forgotten, or evicted from the LRU). Compare ``ktime_ns`` with the proc
        connector event's timestamp: a later record is of a later exec of the same tgid."""
        raw = sys.map_lookup(self._fds().execs, struct.pack("=I", tgid),
                             programs.EXEC_RECORD.size)
        return None if raw is None else parse_exec_record(tgid, raw)

    def transition_record(self, tgid: int) -> ExecRecord | None:
        """``tgid``'s transition record: its latest exec whose role before was cargo (cargo
        ran it: a build script, a test binary, the compiler) or that started a build, kept
        when the process then execs something else (the plain record is overwritten); None
        when there is none. As for :meth:`exec_record`, compare ``ktime_ns`` with the proc
        connector's timestamps: one older than the process is an earlier process's."""
        raw = sys.map_lookup(self._fds().execs,
                             struct.pack("=I", tgid | programs.EXEC_TRANSITION),
                             programs.EXEC_RECORD.size)
        return None if raw is None else parse_exec_record(tgid, raw)

    def forget_exec(self, tgid: int) -> bool:
        """Drop ``tgid``'s exec record and transition record once read; False when there was
        neither."""
        fd = self._fds().execs
        plain = sys.map_delete(fd, struct.pack("=I", tgid))
        return sys.map_delete(fd, struct.pack("=I", tgid | programs.EXEC_TRANSITION)) or plain

    def allow_flow(self, key: bytes, creator: int | None = None) -> None:
        """Record the daemon's verdict for a flow (:func:`programs.flow_key`): the backstop
        lets its packets pass, from ``creator``'s sockets only when one is named (the stamp's
        tgid the daemon judged). Write it *before* accepting the queued packet."""
        sys.map_update(self._fds().verdicts, key, programs.verdict_value(creator))

    def revoke_flow(self, key: bytes) -> bool:
        return sys.map_delete(self._fds().verdicts, key)

    @property
    def sends_ahead(self) -> bool:
        """Whether both connect hooks of ``fast.py`` run (else no SYN is sent ahead)."""
        return "em_connect4" in self.prog_ids and "em_connect6" in self.prog_ids

    def allow_fast(self, key: bytes) -> None:
        """Let this creator's later connects to this destination (:func:`fast.fast_key`)
        send their SYN ahead of the daemon's judgment (``fast.py``)."""
        sys.map_update(self._fds().fast, key, struct.pack("=Q", 0))

    def renew_ahead(self, until_ns: int) -> None:
        """SYNs may go ahead until ``until_ns`` (``CLOCK_MONOTONIC``, as ``time.monotonic_ns``);
        0 stops them at once (``fast.py``, the lease)."""
        sys.map_update(self._fds().lease, struct.pack("=I", 0), struct.pack("=Q", until_ns))

    def join_cgroup(self, cgroup_id: int, value: int) -> None:
        """A process not yet a member that makes a socket in this cgroup (cgroup2 inode)
        becomes the member ``value`` (``sock_create``): a container tied to a build."""
        sys.map_update(self._fds().cgroups, struct.pack("=Q", cgroup_id),
                       struct.pack("=Q", value))

    def leave_cgroup(self, cgroup_id: int) -> bool:
        return sys.map_delete(self._fds().cgroups, struct.pack("=Q", cgroup_id))

    def fast_keys(self) -> list[bytes]:
        return [k for k, _ in sys.map_items(self._fds().fast, fast.FAST_KEY, 8, fast.FAST_MAX)]

    def forget_fast(self, key: bytes) -> bool:
        return sys.map_delete(self._fds().fast, key)

    # The engine hooks (engines.py); each raises BpfUnavailable when they are not loaded.
    def _efds(self) -> EngineFds:
        if self.engine_fds is None:
            raise BpfUnavailable(self.engine_error or "the BPF owner is closed")
        return self.engine_fds

    def set_engine_paths(self, paths: dict[str, int]) -> None:
        """Make ``engine_paths`` exactly ``paths`` (path -> engine index; paths too long
        for a Unix address are left out: no connect can name them)."""
        fd = self._efds().paths
        want = {k: i for p, i in paths.items() if (k := engines.path_key(p))}
        for key in sys.map_keys(fd, engines.PATH_MAX, engines.ENGINES_MAX):
            if key not in want:
                sys.map_delete(fd, key)
        for key, index in want.items():
            sys.map_update(fd, key, struct.pack("=I", index))

    def set_engine_refuse(self, refuse: bool) -> None:
        """Whether the hooks refuse a member's connect to an engine (``-EPERM``)."""
        sys.map_update(self._efds().conf, struct.pack("=I", 0),
                       struct.pack("=I", engines.CONF_REFUSE if refuse else 0))

    def take_engine_hits(self) -> list[Hit]:
        """Every hit recorded since the last call (each read, then deleted)."""
        fd = self._efds().hits
        out = []
        for key in sys.map_keys(fd, engines.HIT_KEY.size, engines.HITS_MAX):
            raw = sys.map_lookup(fd, key, engines.HIT.size)
            sys.map_delete(fd, key)
            hit = None if raw is None else parse_hit(key, raw)
            if hit is not None:
                out.append(hit)
        return out

    def netns_seen(self) -> dict[int, int]:
        """Network namespaces members made sockets in: cookie -> the first such member's tgid
        (the daemon's own namespace included; compare with :func:`netns.cookie_of`)."""
        items = sys.map_items(self._fds().netns, 8, 4, programs.NETNS_MAX)
        return {struct.unpack("=Q", key)[0]: struct.unpack("=I", raw)[0] for key, raw in items}

    def forget_netns(self, cookie: int) -> bool:
        """Drop a namespace from ``netns`` (handled, or gone): the next member socket made in
        it writes it again."""
        return sys.map_delete(self._fds().netns, struct.pack("=Q", cookie))

    def stats(self) -> dict[str, int]:
        fd = self._fds().stats
        out = {}
        for i, name in enumerate(programs.STATS):
            raw = sys.map_lookup(fd, struct.pack("=I", i), 8)
            out[name] = 0 if raw is None else int(struct.unpack("=Q", raw)[0])
        return out
