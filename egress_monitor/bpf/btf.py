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


class Btf:
    """The decoded type section, read lazily: the kind, size/type and vlen of every type are
    decoded at parse time; names and struct members only when a lookup needs them (parsing the
    running kernel's 126,000 types whole took 0.7-1.5 s at every start)."""

    def __init__(self, blob: bytes, strings: bytes, kinds: list[int], infos: list[int],
                 sizes: list[int], name_offs: list[int], tails: list[int]) -> None:
        self._blob, self._strings = blob, strings
        self._kinds, self._infos, self._sizes = kinds, infos, sizes
        self._name_offs, self._tails = name_offs, tails
        self.types = _Types(self)
        self._by_name: dict[tuple[int, str], int | None] = {}

    def __len__(self) -> int:
        return len(self._kinds)

    def name_at(self, off: int) -> str:
        if off >= len(self._strings):
            raise BtfError("name offset past the string section")
        end = self._strings.find(b"\0", off)
        return self._strings[off:end if end >= 0 else len(self._strings)].decode(
            errors="replace")

    def type(self, tid: int) -> Type:
        kind, info = self._kinds[tid], self._infos[tid]
        members: tuple[tuple[str, int, int], ...] = ()
        if kind in (STRUCT, UNION):
            tail = self._tails[tid]
            members = tuple((self.name_at(m[0]), m[1], m[2]) for m in struct.iter_unpack(
                "<III", self._blob[tail:tail + 12 * (info & 0xFFFF)]))
        off = self._name_offs[tid]
        return Type(kind, self.name_at(off) if off else "", self._sizes[tid], info & 0xFFFF,
                    bool(info >> 31), members)

    def lookup(self, kind: int, name: str) -> int | None:
        """The first type of ``kind`` named ``name`` (the string table holds each name once,
        so its offset is found first, then the types naming it)."""
        key = (kind, name)
        if key in self._by_name:
            return self._by_name[key]
        found = None
        needle = b"\0" + name.encode() + b"\0"
        at = self._strings.find(needle)
        while at >= 0 and found is None:
            off, i = at + 1, 0
            while True:
                try:
                    i = self._name_offs.index(off, i + 1)
                except ValueError:
                    break
                if self._kinds[i] == kind:
                    found = i
                    break
            at = self._strings.find(needle, at + 1)
        self._by_name[key] = found
        return found

    def struct_id(self, name: str) -> int:
        tid = self.lookup(STRUCT, name)
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
        if not 0 < tid < len(self) or depth > 8:
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
            if not 0 < tid < len(self) or self._kinds[tid] not in _MODIFIERS:
                return tid
            tid = self._sizes[tid]
        raise BtfError("typedef chain too long")

    def func_id(self, name: str) -> int:
        """The type id of kernel function ``name`` (what an LSM or tracing program's
        ``attach_btf_id`` names)."""
        tid = self.lookup(FUNC, name)
        if tid is None:
            raise BtfError(f"function {name} not in BTF")
        return tid

    def tracepoint_args(self, name: str) -> int:
        """How many arguments raw tracepoint ``name`` passes (from ``btf_trace_<name>``)."""
        tid = self.lookup(TYPEDEF, f"btf_trace_{name}")
        if tid is None:
            raise BtfError(f"tracepoint {name} not in BTF")
        ptr = self._sizes[tid]
        if not 0 < ptr < len(self) or self._kinds[ptr] != PTR:
            raise BtfError(f"btf_trace_{name} is not a function pointer")
        proto = self._sizes[ptr]
        if not 0 < proto < len(self) or self._kinds[proto] != FUNC_PROTO:
            raise BtfError(f"btf_trace_{name} is not a function pointer")
        return (self._infos[proto] & 0xFFFF) - 1  # the first parameter is the tracepoint's void *


class _Types:
    """``btf.types[tid]``: a :class:`Type` decoded on demand."""

    def __init__(self, btf: Btf) -> None:
        self._btf = btf

    def __len__(self) -> int:
        return len(self._btf)

    def __getitem__(self, tid: int) -> Type:
        return self._btf.type(tid)


def parse(blob: bytes) -> Btf:
    """Decode the type section of a BTF blob (names and members on demand, above)."""
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
    kinds, infos, sizes, name_offs, tails = [0], [0], [0], [0], [0]
    unpack, tails_of = struct.unpack_from, _TAIL
    pos, end = t0, t0 + type_len
    while pos < end:
        if pos + 12 > end:
            raise BtfError("truncated type")
        name_off, info, size_or_type = unpack("<III", blob, pos)
        kind = (info >> 24) & 0x1F
        shape = tails_of.get(kind)
        if shape is None:
            raise BtfError(f"unknown BTF kind {kind}")
        tail = pos + 12
        pos = tail + shape[0] + shape[1] * (info & 0xFFFF)
        if pos > end:
            raise BtfError("truncated type")
        if name_off >= str_len and name_off:
            raise BtfError("name offset past the string section")
        kinds.append(kind)
        infos.append(info)
        sizes.append(size_or_type)
        name_offs.append(name_off)
        tails.append(tail)
    return Btf(blob, strings, kinds, infos, sizes, name_offs, tails)


def load_vmlinux(path: Path = VMLINUX) -> Btf:
    """The running kernel's BTF; raises :class:`BtfError` when the kernel has none."""
    try:
        return parse(path.read_bytes())
    except OSError as e:
        raise BtfError(f"cannot read {path}: {e.strerror} (kernel built without "
                       "CONFIG_DEBUG_INFO_BTF?)") from None


def int_types_blob() -> bytes:
    """A BTF blob declaring type 1 ``int`` (4 bytes, signed), type 2 ``__u64`` and type 3
    ``__u64[4]``: what a socket-storage map needs for its key (int) and its value (32 bytes:
    ``fast.SOCKET_VALUE``)."""
    names = b"\0int\0__u64\0"
    types = struct.pack("<IIII", 1, INT << 24, 4, (1 << 24) | 32)
    types += struct.pack("<IIII", 5, INT << 24, 8, 64)
    types += struct.pack("<IIIIII", 0, ARRAY << 24, 0, 2, 1, 4)
    return struct.pack("<HBBIIIII", MAGIC, 1, 0, 24, 0, len(types), len(types),
                       len(names)) + types + names
