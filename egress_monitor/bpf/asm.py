"""A small eBPF assembler: the instructions our programs use, with labels for jumps.

Each method appends one instruction (``ld_imm64`` and ``ld_map_fd`` two slots, as the ISA says);
:meth:`Asm.assemble` resolves labels and returns the bytes ``BPF_PROG_LOAD`` takes. Pure: no
kernel access, so the encoding is table-tested against the ISA's documented bytes.

Why hand-assembled rather than C built with clang/libbpf: runners would need clang and libbpf
(or we would ship a prebuilt object per kernel family), and the programs are small (under 80
instructions each); offsets into kernel structs come from the running kernel's BTF at load
time (``btf.py``), which is what CO-RE would do for us in C.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Registers.
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

# Classes, sizes, modes, operations (linux/bpf_common.h, linux/bpf.h).
LD, LDX, ST, STX, ALU, JMP, ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM, ATOMIC = 0x00, 0x60, 0xC0
K, X = 0x00, 0x08
ADD, SUB, AND, OR, LSH, RSH, MOV = 0x00, 0x10, 0x50, 0x40, 0x60, 0x70, 0xB0
JA, JEQ, JGT, JNE, JSGT, JSLT, CALL, EXIT = 0x00, 0x10, 0x20, 0x50, 0x60, 0xC0, 0x80, 0x90
PSEUDO_MAP_FD, PSEUDO_KFUNC_CALL = 1, 2

SIZES = {1: B, 2: H, 4: W, 8: DW}


class AsmError(ValueError):
    """An unknown label, a jump out of range or an operand that does not fit."""


@dataclass(frozen=True)
class _Insn:
    code: int
    dst: int
    src: int
    off: int | str  # a label until assembled
    imm: int


class Asm:
    """An instruction list under construction."""

    def __init__(self) -> None:
        self._insns: list[_Insn] = []
        self._labels: dict[str, int] = {}

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0,
              imm: int = 0) -> Asm:
        if not -(1 << 31) <= imm < (1 << 32):
            raise AsmError(f"immediate {imm:#x} does not fit 32 bits")
        self._insns.append(_Insn(code, dst, src, off, imm))
        return self

    def label(self, name: str) -> Asm:
        if name in self._labels:
            raise AsmError(f"label {name} defined twice")
        self._labels[name] = len(self._insns)
        return self

    # ALU: ``op`` is one of ADD/SUB/AND/OR/LSH/RSH/MOV; 64-bit unless ``wide`` is False.
    def alu_imm(self, op: int, dst: int, imm: int, wide: bool = True) -> Asm:
        return self._emit((ALU64 if wide else ALU) | op | K, dst, 0, 0, imm)

    def alu_reg(self, op: int, dst: int, src: int, wide: bool = True) -> Asm:
        return self._emit((ALU64 if wide else ALU) | op | X, dst, src)

    def mov_imm(self, dst: int, imm: int) -> Asm:
        return self.alu_imm(MOV, dst, imm)

    def mov(self, dst: int, src: int) -> Asm:
        return self.alu_reg(MOV, dst, src)

    def ld_imm64(self, dst: int, value: int, src: int = 0) -> Asm:
        value &= (1 << 64) - 1
        self._emit(LD | DW | IMM, dst, src, 0, value & 0xFFFFFFFF)
        return self._emit(0, 0, 0, 0, value >> 32)

    def ld_map_fd(self, dst: int, fd: int) -> Asm:
        return self.ld_imm64(dst, fd, PSEUDO_MAP_FD)

    def ldx(self, size: int, dst: int, src: int, off: int) -> Asm:
        return self._emit(LDX | MEM | SIZES[size], dst, src, off)

    def stx(self, size: int, dst: int, off: int, src: int) -> Asm:
        return self._emit(STX | MEM | SIZES[size], dst, src, off)

    def st_imm(self, size: int, dst: int, off: int, imm: int) -> Asm:
        return self._emit(ST | MEM | SIZES[size], dst, 0, off, imm)

    def atomic_add64(self, dst: int, off: int, src: int) -> Asm:
        return self._emit(STX | ATOMIC | DW, dst, src, off, ADD)

    def jmp_imm(self, op: int, dst: int, imm: int, target: str, wide: bool = True) -> Asm:
        return self._emit((JMP if wide else 0x06) | op | K, dst, 0, target, imm)

    def jmp_reg(self, op: int, dst: int, src: int, target: str, wide: bool = True) -> Asm:
        return self._emit((JMP if wide else 0x06) | op | X, dst, src, target)

    def ja(self, target: str) -> Asm:
        return self._emit(JMP | JA, 0, 0, target)

    def call(self, helper: int) -> Asm:
        return self._emit(JMP | CALL, 0, 0, 0, helper)

    def call_kfunc(self, btf_id: int) -> Asm:
        """Call a kernel function by its vmlinux BTF id (``BPF_PSEUDO_KFUNC_CALL``)."""
        return self._emit(JMP | CALL, 0, PSEUDO_KFUNC_CALL, 0, btf_id)

    def exit(self) -> Asm:
        return self._emit(JMP | EXIT)

    def __len__(self) -> int:
        return len(self._insns)

    def assemble(self) -> bytes:
        """The program's bytes; raises :class:`AsmError` on an unknown label."""
        out = bytearray()
        for pc, insn in enumerate(self._insns):
            off = insn.off
            if isinstance(off, str):
                if off not in self._labels:
                    raise AsmError(f"unknown label {off}")
                off = self._labels[off] - pc - 1
            if not -(1 << 15) <= off < (1 << 15):
                raise AsmError(f"offset {off} out of range at {pc}")
            out += struct.pack("<BBhi", insn.code, (insn.src << 4) | insn.dst, off,
                               insn.imm - (1 << 32) if insn.imm >= (1 << 31) else insn.imm)
        return bytes(out)


# Helper ids (enum bpf_func_id).
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM = 1, 2, 3
KTIME_GET_NS, GET_CURRENT_PID_TGID, SKB_LOAD_BYTES, GET_CURRENT_CGROUP_ID = 5, 14, 26, 80
PROBE_READ_KERNEL, PROBE_READ_KERNEL_STR = 113, 115
SK_FULLSOCK, SK_STORAGE_GET = 95, 107
