"""The assembler's encodings, checked against the eBPF ISA's documented bytes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from egress_monitor.bpf.asm import (
    AND,
    JEQ,
    JNE,
    R0,
    R1,
    R7,
    R10,
    Asm,
    AsmError,
)


def hexes(code: bytes) -> list[str]:
    return [code[i:i + 8].hex(" ") for i in range(0, len(code), 8)]


@pytest.mark.parametrize("build, expected", [
    (lambda a: a.mov_imm(R0, 0).exit(), ["b7 00 00 00 00 00 00 00", "95 00 00 00 00 00 00 00"]),
    (lambda a: a.ld_map_fd(R1, 5), ["18 11 00 00 05 00 00 00", "00 00 00 00 00 00 00 00"]),
    (lambda a: a.ld_imm64(R1, 1 << 63), ["18 01 00 00 00 00 00 00", "00 00 00 00 00 00 00 80"]),
    (lambda a: a.ldx(8, R7, R0, 0), ["79 07 00 00 00 00 00 00"]),
    (lambda a: a.stx(4, R10, -4, R0), ["63 0a fc ff 00 00 00 00"]),
    (lambda a: a.st_imm(8, R10, -24, 0), ["7a 0a e8 ff 00 00 00 00"]),
    (lambda a: a.call(14), ["85 00 00 00 0e 00 00 00"]),
    (lambda a: a.call_kfunc(63462), ["85 20 00 00 e6 f7 00 00"]),  # BPF_PSEUDO_KFUNC_CALL
    (lambda a: a.atomic_add64(R0, 0, R1), ["db 10 00 00 00 00 00 00"]),
    (lambda a: a.alu_imm(AND, R1, 0x80000000, wide=False), ["54 01 00 00 00 00 00 80"]),
    (lambda a: a.mov(R1, R10), ["bf a1 00 00 00 00 00 00"]),
])
def test_encodings(build: Callable[[Asm], Asm], expected: list[str]) -> None:
    assert hexes(build(Asm()).assemble()) == expected


def test_labels_resolve_forward_and_backward_and_count_wide_slots() -> None:
    a = Asm().label("top").jmp_imm(JEQ, R0, 0, "end").ld_imm64(R1, 7)
    a.jmp_imm(JNE, R1, 1, "top", wide=False).label("end").exit()
    code = hexes(a.assemble())
    assert code[0] == "15 00 03 00 00 00 00 00"  # over the two-slot ld_imm64 and the jump
    assert code[3] == "56 01 fc ff 01 00 00 00"  # JMP32 back to pc 0
    assert len(a) == 5


@pytest.mark.parametrize("build", [
    lambda a: a.ja("nowhere"),
    lambda a: a.label("x").label("x"),
    lambda a: a.mov_imm(R0, 1 << 32),
])
def test_errors(build: Callable[[Asm], Asm]) -> None:
    with pytest.raises(AsmError):
        build(Asm()).assemble()
