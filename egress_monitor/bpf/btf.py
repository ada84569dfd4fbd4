"""A tiny BTF reader: byte offsets of struct members and tracepoint argument counts.

Our raw-tracepoint programs read ``task_struct``, ``linux_binprm``, ``file``, ``inode`` and
``super_block`` fields with ``bpf_probe_read_kernel``; their offsets differ between kernel
builds, so they are read at start from the running kernel's BTF (``/sys/kernel/btf/vmlinux``).

:func:`parse` is pure and total: for any bytes it returns a :class:`Btf` or raises
:class:`BtfError` (never another exception), in time linear in the input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT = 9, 10, 11, 12, 13, 14, 15, 16
DECL_TAG, TYPE_TAG, ENUM64 = 17, 18, 19

# Bytes that follow the 12-byte header of a type: (fixed, per vlen entry).
_TAIL = {INT: (4, 0), PTR: (0, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12),
         ENUM: (0, 8), FWD: (0, 0), TYPEDEF: (0, 0), VOLATILE: (0, 0), CONST: (0, 0),
         RESTRICT: (0, 0), FUNC: (0, 0), FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12),
         FLOAT: (0, 0), DECL_TAG: (4, 0), TYPE_TAG: (0, 0), ENUM64: (0, 12)}
_MODIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


class BtfError(ValueError):
    """The blob is not BTF, is truncated, or lacks the struct, member or tracepoint asked for."""


@dataclass(frozen=True)
class Type:
    kind: int
    name: str
    size_or_type: int
    vlen: int
    kind_flag: bool
    members: tuple[tuple[str, int, int], ...]  # (name, type id, bit offset) for struct/union


@dataclass(frozen=True)
class Btf:
    types: tuple[Type, ...]  # index 0 is the void type
    by_name: dict[tuple[int, str], int]

    def struct_id(self, name: str) -> int:
        tid = self.by_name.get((STRUCT, name))
        if tid is None:
            raise BtfError(f"struct {name} not in BTF")
        return tid

    def member_offset(self, struct_name: str, member: str) -> int:
        """Byte offset of ``member`` in ``struct_name``, looking through anonymous members."""
        found = self._find(self.struct_id(struct_name), member, 0, depth=0)
        if found is None:
            raise BtfError(f"struct {struct_name} has no member {member}")
        if found % 8:
            raise BtfError(f"{struct_name}.{member} is a bitfield")
        return found // 8

    def _find(self, tid: int, member: str, base: int, depth: int) -> int | None:
        if not 0 < tid < len(self.types) or depth > 8:
            return None
        t = self.types[tid]
        if t.kind not in (STRUCT, UNION):
            return None
        for name, mtype, bits in t.members:
            bits = bits & 0xFFFFFF if t.kind_flag else bits
            if name == member:
                return base + bits
            if not name:
                inner = self._find(self.resolve(mtype), member, base + bits, depth + 1)
                if inner is not None:
                    return inner
        return None

    def resolve(self, tid: int) -> int:
        """Skip typedefs and qualifiers (bounded: a cycle is an error, not a hang)."""
        for _ in range(32):
            if not 0 < tid < len(self.types) or self.types[tid].kind not in _MODIFIERS:
                return tid
            tid = self.types[tid].size_or_type
        raise BtfError("typedef chain too long")

    def func_id(self, name: str) -> int:
        """The type id of kernel function ``name`` (what an LSM or tracing program's
        ``attach_btf_id`` names)."""
        tid = self.by_name.get((FUNC, name))
        if tid is None:
            raise BtfError(f"function {name} not in BTF")
        return tid

    def tracepoint_args(self, name: str) -> int:
        """How many arguments raw tracepoint ``name`` passes (from ``btf_trace_<name>``)."""
        tid = self.by_name.get((TYPEDEF, f"btf_trace_{name}"))
        if tid is None:
            raise BtfError(f"tracepoint {name} not in BTF")
        ptr = self.types[tid].size_or_type
        if not 0 < ptr < len(self.types) or self.types[ptr].kind != PTR:
            raise BtfError(f"btf_trace_{name} is not a function pointer")
        proto = self.types[ptr].size_or_type
        if not 0 < proto < len(self.types) or self.types[proto].kind != FUNC_PROTO:
            raise BtfError(f"btf_trace_{name} is not a function pointer")
        return self.types[proto].vlen - 1  # the first parameter is the tracepoint's void *


def parse(blob: bytes) -> Btf:
    """Decode the type section of a BTF blob."""
    if len(blob) < 24:
        raise BtfError("BTF shorter than its header")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
    if magic != MAGIC:
        raise BtfError("not BTF (bad magic)")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
    t0, s0 = hdr_len + type_off, hdr_len + str_off
    if hdr_len < 24 or t0 + type_len > len(blob) or s0 + str_len > len(blob):
        raise BtfError("BTF sections run past the end")
    strings = blob[s0:s0 + str_len]

    def name_at(off: int) -> str:
        if off >= len(strings):
            raise BtfError("name offset past the string section")
        end = strings.find(b"\0", off)
        return strings[off:end if end >= 0 else len(strings)].decode(errors="replace")

    types: list[Type] = [Type(0, "", 0, 0, False, ())]
    by_name: dict[tuple[int, str], int] = {}
    pos, end = t0, t0 + type_len
    while pos < end:
        if pos + 12 > end:
            raise BtfError("truncated type")
        name_off, info, size_or_type = struct.unpack_from("<III", blob, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
        if kind not in _TAIL:
            raise BtfError(f"unknown BTF kind {kind}")
        fixed, per = _TAIL[kind]
        tail = pos + 12
        pos = tail + fixed + per * vlen
        if pos > end:
            raise BtfError("truncated type")
        members: tuple[tuple[str, int, int], ...] = ()
        if kind in (STRUCT, UNION):
            members = tuple((name_at(m[0]), m[1], m[2])
                            for m in struct.iter_unpack("<III", blob[tail:pos]))
        name = name_at(name_off) if name_off else ""
        types.append(Type(kind, name, size_or_type, vlen, kflag, members))
        if name and kind in (STRUCT, TYPEDEF, FUNC):
            by_name.setdefault((kind, name), len(types) - 1)
    return Btf(tuple(types), by_name)


def load_vmlinux(path: Path = VMLINUX) -> Btf:
    """The running kernel's BTF; raises :class:`BtfError` when the kernel has none."""
    try:
        return parse(path.read_bytes())
    except OSError as e:
        raise BtfError(f"cannot read {path}: {e.strerror} (kernel built without "
                       "CONFIG_DEBUG_INFO_BTF?)") from None


def int_types_blob() -> bytes:
    """A BTF blob declaring type 1 ``int`` (4 bytes, signed) and type 2 ``__u64``: what a
    socket-storage map needs for its key (int) and value (u64)."""
    names = b"\0int\0__u64\0"
    types = struct.pack("<IIII", 1, INT << 24, 4, (1 << 24) | 32)
    types += struct.pack("<IIII", 5, INT << 24, 8, 64)
    return struct.pack("<HBBIIIII", MAGIC, 1, 0, 24, 0, len(types), len(types),
                       len(names)) + types + names
