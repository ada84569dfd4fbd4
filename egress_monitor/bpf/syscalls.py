"""The bpf(2) system call through ctypes: maps, program load, cgroup attach, raw tracepoints.

No libbpf and no compiler: every command packs its ``union bpf_attr`` by hand (the layouts are
the kernel's UAPI, stable since the commands were added). Each function returns a file
descriptor or raises :class:`BpfError` naming the command and errno; a program the verifier
refuses raises with the verifier's log, so a refusal on a new kernel says which instruction.

Nothing here keeps state: the caller owns every descriptor returned (see ``owner.py``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

NR_BPF = 280 if os.uname().machine == "aarch64" else 321  # else x86_64
_ATTR_SIZE = 128  # larger than every layout used here; the kernel zero-checks the tail

# Commands (enum bpf_cmd).
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD, PROG_ATTACH, PROG_DETACH = 5, 8, 9
PROG_GET_NEXT_ID, MAP_GET_NEXT_ID, PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID = 11, 12, 13, 14
OBJ_GET_INFO_BY_FD, PROG_QUERY, RAW_TRACEPOINT_OPEN, BTF_LOAD = 15, 16, 17, 18
ENABLE_STATS = 32
MAP_LOOKUP_BATCH = 24
_BATCH = 1024  # entries per BPF_MAP_LOOKUP_BATCH call
_NO_BATCH = frozenset({errno.EINVAL, errno.EOPNOTSUPP, 524})  # 524: the kernel's ENOTSUPP

# Map types, program types, attach types, flags.
MAP_HASH, MAP_ARRAY, MAP_PERCPU_ARRAY, MAP_LRU_HASH, MAP_SK_STORAGE = 1, 2, 6, 9, 24
F_NO_PREALLOC = 1
PROG_CGROUP_SKB, PROG_CGROUP_SOCK, PROG_RAW_TRACEPOINT, PROG_CGROUP_SOCK_ADDR = 8, 9, 17, 18
PROG_CGROUP_SOCKOPT = 25
ATTACH_CGROUP_INET_EGRESS, ATTACH_CGROUP_INET_SOCK_CREATE, ATTACH_CGROUP_SETSOCKOPT = 1, 2, 22
ATTACH_CGROUP_INET4_CONNECT, ATTACH_CGROUP_INET6_CONNECT = 10, 11
F_ALLOW_MULTI = 2
UPDATE_ANY, UPDATE_NOEXIST = 0, 1


class BpfError(OSError):
    """A bpf(2) command failed: ``errno`` is set; ``log`` holds the verifier's output if any."""

    def __init__(self, what: str, err: int, log: str = "") -> None:
        detail = f"{what}: {os.strerror(err)} (errno {err})"
        if log:
            detail += "\nverifier log:\n" + log
        super().__init__(err, detail)
        self.log = log

    def __str__(self) -> str:
        return str(self.args[1])


def _call(cmd: int, attr: bytes, what: str) -> int:
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    ret = _libc.syscall(NR_BPF, cmd, buf, _ATTR_SIZE)
    if ret < 0:
        raise BpfError(what, ctypes.get_errno())
    return int(ret)


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def _name(name: str) -> bytes:
    return name.encode()[:15].ljust(16, b"\0")


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str, flags: int = 0, btf: tuple[int, int, int] | None = None) -> int:
    """Create a map; returns its descriptor. ``btf`` is (BTF fd, key type id, value type id),
    which socket-storage maps require."""
    btf_fd, key_id, value_id = btf or (0, 0, 0)
    attr = struct.pack("=IIIIIII16sIIII", map_type, key_size, value_size, max_entries, flags,
                       0, 0, _name(name), 0, btf_fd, key_id, value_id)
    return _call(MAP_CREATE, attr, f"map_create {name}")


def btf_load(blob: bytes) -> int:
    """Load a BTF blob (types for map keys and values); returns its descriptor."""
    data = ctypes.create_string_buffer(blob, len(blob))
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack("=QQIII", _addr(data), _addr(log), len(blob), len(log), 1)
    try:
        return _call(BTF_LOAD, attr, "btf_load")
    except BpfError as e:
        raise BpfError("btf_load", e.errno or 0, log.value.decode(errors="replace")) from None


def map_update(fd: int, key: bytes, value: bytes, flags: int = UPDATE_ANY) -> None:
    """Write one element (raises with EEXIST for NOEXIST on a present key, E2BIG when full)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _call(MAP_UPDATE_ELEM, struct.pack("=IIQQQ", fd, 0, _addr(k), _addr(v), flags),
          "map_update")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """One element's value, or None when the key is absent."""
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    try:
        _call(MAP_LOOKUP_ELEM, struct.pack("=IIQQQ", fd, 0, _addr(k), _addr(v), 0), "map_lookup")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Remove one element; False when it was absent."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _call(MAP_DELETE_ELEM, struct.pack("=IIQ", fd, 0, _addr(k)), "map_delete")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int, limit: int) -> list[bytes]:
    """Every key (at most ``limit``, the map's size: bounded even while the kernel writes)."""
    keys: list[bytes] = []
    nxt = ctypes.create_string_buffer(key_size)
    cur: ctypes.Array[ctypes.c_char] | None = None
    while len(keys) < limit:
        attr = struct.pack("=IIQQ", fd, 0, _addr(cur) if cur is not None else 0, _addr(nxt))
        try:
            _call(MAP_GET_NEXT_KEY, attr, "map_get_next_key")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                break
            raise
        keys.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)
    return keys


def map_items(fd: int, key_size: int, value_size: int, limit: int) -> list[tuple[bytes, bytes]]:
    """Every ``(key, value)`` of a hash map (at most ``limit``), up to 1,024 a call
    (``BPF_MAP_LOOKUP_BATCH``); key by key where the kernel has no batch lookup for the map.
    A map written meanwhile may give an entry changed since, never one twice in a batch."""
    keys = ctypes.create_string_buffer(key_size * _BATCH)
    values = ctypes.create_string_buffer(value_size * _BATCH)
    token_in, token_out = ctypes.create_string_buffer(8), ctypes.create_string_buffer(8)
    out: list[tuple[bytes, bytes]] = []
    first = True
    while len(out) < limit:
        attr = ctypes.create_string_buffer(struct.pack(
            "=QQQQIIQQ", 0 if first else _addr(token_in), _addr(token_out), _addr(keys),
            _addr(values), _BATCH, fd, 0, 0), _ATTR_SIZE)
        done = _libc.syscall(NR_BPF, MAP_LOOKUP_BATCH, attr, _ATTR_SIZE) < 0
        err = ctypes.get_errno() if done else 0
        if done and err != errno.ENOENT:
            if first and err in _NO_BATCH | {errno.ENOSPC}:
                return _items_by_key(fd, key_size, value_size, limit)
            raise BpfError("map_lookup_batch", err)
        count = struct.unpack_from("=I", attr.raw, 32)[0]
        kb, vb = keys.raw, values.raw  # each .raw is a copy of the whole buffer: once a call
        out += [(kb[i * key_size:(i + 1) * key_size], vb[i * value_size:(i + 1) * value_size])
                for i in range(count)]
        if done:  # ENOENT: that was the last of them
            break
        ctypes.memmove(token_in, token_out, 8)
        first = False
    return out[:limit]


def _items_by_key(fd: int, key_size: int, value_size: int,
                  limit: int) -> list[tuple[bytes, bytes]]:
    out = []
    for key in map_keys(fd, key_size, limit):
        value = map_lookup(fd, key, value_size)
        if value is not None:  # deleted since the key was read
            out.append((key, value))
    return out


def prog_load(prog_type: int, insns: bytes, name: str, expected_attach_type: int = 0) -> int:
    """Load a program; on refusal, raise with the verifier's log."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")  # probe_read_kernel is GPL-only
    log = ctypes.create_string_buffer(1 << 20)
    attr = struct.pack("=IIQQIIQII16sII", prog_type, len(insns) // 8, _addr(code), _addr(lic),
                       1, len(log), _addr(log), 0, 0, _name(name), 0, expected_attach_type)
    try:
        return _call(PROG_LOAD, attr, f"prog_load {name}")
    except BpfError as e:
        raise BpfError(f"prog_load {name}", e.errno or 0,
                       log.value.decode(errors="replace")) from None


def prog_attach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    """Attach to a cgroup alongside anyone else's programs (BPF_F_ALLOW_MULTI)."""
    _call(PROG_ATTACH, struct.pack("=IIII", cgroup_fd, prog_fd, attach_type, F_ALLOW_MULTI),
          "prog_attach")


def prog_detach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    """Detach exactly this program (a multi-attached cgroup needs the program named)."""
    _call(PROG_DETACH, struct.pack("=IIII", cgroup_fd, prog_fd, attach_type, 0), "prog_detach")


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """Attach to a raw tracepoint; closing the returned descriptor detaches."""
    n = ctypes.create_string_buffer(name.encode())
    return _call(RAW_TRACEPOINT_OPEN, struct.pack("=QI", _addr(n), prog_fd),
                 f"raw_tracepoint_open {name}")


def obj_id(fd: int) -> int:
    """The kernel-wide id of a program or map (``id`` is the second u32 of both info structs)."""
    info = ctypes.create_string_buffer(64)
    _call(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 64, _addr(info)), "obj_get_info")
    return int(struct.unpack_from("=I", info.raw, 4)[0])


def prog_name(fd: int) -> str:
    """A loaded program's name (``bpf_prog_info.name``, at offset 64, 16 bytes)."""
    info = ctypes.create_string_buffer(128)
    _call(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 128, _addr(info)), "obj_get_info")
    return info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")


def enable_run_stats() -> int:
    """Make the kernel time every BPF program's runs (BPF_STATS_RUN_TIME) for as long as the
    returned descriptor is open (closing it, or the process dying, turns it off again)."""
    return _call(ENABLE_STATS, struct.pack("=I", 0), "enable_stats")


def prog_run_stats(fd: int) -> tuple[int, int, int]:
    """A program's ``(run_time_ns, run_cnt, recursion_misses)`` (counted while run stats are
    enabled; misses always): offsets 192, 200, 208 of ``struct bpf_prog_info``."""
    info = ctypes.create_string_buffer(216)
    _call(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 216, _addr(info)), "obj_get_info")
    run_time, runs, misses = struct.unpack_from("=QQQ", info.raw, 192)
    return int(run_time), int(runs), int(misses)


def map_fd_by_id(map_id: int) -> int:
    """A new descriptor for a map (what a root process can do to ours)."""
    return _call(MAP_GET_FD_BY_ID, struct.pack("=I", map_id), "map_get_fd_by_id")


def map_name(fd: int) -> str:
    """A map's name (``bpf_map_info.name``, at offset 24, 16 bytes)."""
    info = ctypes.create_string_buffer(80)
    _call(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 80, _addr(info)), "obj_get_info")
    return info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")


def prog_fd_by_id(prog_id: int) -> int:
    """A new descriptor for a loaded program (what a root process can do to ours)."""
    return _call(PROG_GET_FD_BY_ID, struct.pack("=I", prog_id), "prog_get_fd_by_id")


def prog_query(cgroup_fd: int, attach_type: int, limit: int = 64) -> list[int]:
    """Ids of the programs attached to a cgroup for one attach type."""
    ids = (ctypes.c_uint32 * limit)()
    attr = ctypes.create_string_buffer(struct.pack("=IIIIQI", cgroup_fd, attach_type, 0, 0,
                                                   ctypes.addressof(ids), limit), _ATTR_SIZE)
    if _libc.syscall(NR_BPF, PROG_QUERY, attr, _ATTR_SIZE) < 0:
        raise BpfError("prog_query", ctypes.get_errno())
    count = struct.unpack_from("=I", attr.raw, 24)[0]
    return list(ids[:count])


def ids(kind: str) -> list[int]:
    """Every live program (``kind='prog'``) or map (``'map'``) id on the machine."""
    cmd = PROG_GET_NEXT_ID if kind == "prog" else MAP_GET_NEXT_ID
    found: list[int] = []
    start = 0
    while True:
        attr = ctypes.create_string_buffer(struct.pack("=II", start, 0), _ATTR_SIZE)
        if _libc.syscall(NR_BPF, cmd, attr, _ATTR_SIZE) < 0:
            if ctypes.get_errno() == errno.ENOENT:
                return found
            raise BpfError(f"{kind}_get_next_id", ctypes.get_errno())
        start = struct.unpack_from("=I", attr.raw, 4)[0]
        found.append(start)
