"""The programs assemble for any kernel's offsets and carry the layout they were built for.

What they do is tested on the real kernel (tests/kernel/test_bpf.py); here: every label
resolves, each program stays small, and the mark layout and map descriptors end up in the
instructions (so a layout change cannot silently stamp with the old bits)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from egress_monitor.bpf import programs
from egress_monitor.bpf.marks import MarkLayout
from egress_monitor.bpf.programs import MapFds, Offsets

FDS = MapFds(members=11, toolchain=12, verdicts=13, stats=14, sockets=15, execs=16,
             exec_scratch=17, netns=18)
OFFS = Offsets(task_tgid=1268, binprm_file=64, file_inode=32, inode_ino=64, inode_sb=40,
               sb_dev=16, exit_has_group_dead=True, task_signal=1848, signal_live=4,
               binprm_filename=96)


def insns(code: bytes) -> list[tuple[int, int, int, int]]:
    """(opcode, regs, off, imm) per 8-byte slot."""
    return [struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8)]


def map_fds(code: bytes) -> set[int]:
    return {imm for op, regs, _off, imm in insns(code) if op == 0x18 and regs >> 4 == 1}


@pytest.mark.parametrize("build, maps", [
    (lambda: programs.fork_program(FDS, OFFS), {11, 14}),
    (lambda: programs.exec_program(FDS, OFFS), {11, 12, 14, 16, 17}),
    (lambda: programs.exit_program(FDS, OFFS), {11, 14}),
    (lambda: programs.exit_program(FDS, Offsets(**{**OFFS.__dict__,
                                                   "exit_has_group_dead": False})), {11, 14}),
    (lambda: programs.sock_create_program(FDS, MarkLayout()), {11, 14, 15, 18}),
    (lambda: programs.sock_create_program(MapFds(**{**FDS.__dict__, "cgroups": 19}),
                                          MarkLayout()), {11, 14, 15, 18, 19}),
    (lambda: programs.backstop_program(FDS, MarkLayout()), {13, 14, 15}),
    (lambda: programs.sockopt_program(FDS, 4096), {14, 15}),
])
def test_programs_assemble_small_and_use_only_their_maps(build: Callable[[], bytes],
                                                        maps: set[int]) -> None:
    code = build()
    assert len(code) % 8 == 0 and len(code) // 8 < 256  # exec, the largest: about 245
    assert map_fds(code) == maps


def test_sock_create_carries_the_layout() -> None:
    layout = MarkLayout(tag=0x1, tag_mask=0x3, tgid_bits=22, tgid_shift=8)
    imms = [imm & 0xFFFFFFFF for _op, _r, _o, imm in insns(
        programs.sock_create_program(FDS, layout))]
    assert layout.tgid_mask in imms and 8 in imms and 0x1 in imms


def test_backstop_checks_stamps_with_the_layout() -> None:
    layout = MarkLayout(tag=0x1, tag_mask=0x3, tgid_bits=22, tgid_shift=8)
    imms = [imm & 0xFFFFFFFF for _op, _r, _o, imm in insns(
        programs.backstop_program(FDS, layout))]
    assert layout.tgid_mask in imms and 8 in imms and 0x1 in imms and 0x3 in imms


def test_sockopt_matches_so_mark_and_the_page_size() -> None:
    imms = {imm for _op, _r, _o, imm in insns(programs.sockopt_program(FDS, 65536))}
    assert {programs.SOL_SOCKET, programs.SO_MARK, 65536} <= imms


def test_exec_writes_transition_records_under_their_own_key_bit() -> None:
    imms = {imm & 0xFFFFFFFF for _op, _r, _o, imm in insns(programs.exec_program(FDS, OFFS))}
    assert programs.EXEC_TRANSITION in imms and programs.EXEC_TRANSITION >= 1 << 22


def test_exec_reads_the_offsets_it_was_given() -> None:
    imms = {imm for _op, _r, _o, imm in insns(programs.exec_program(FDS, OFFS))}
    assert {OFFS.binprm_file, OFFS.file_inode, OFFS.inode_ino, OFFS.inode_sb,
            OFFS.sb_dev, OFFS.binprm_filename} <= imms


def test_keys() -> None:
    assert programs.file_key(0x800001, 42) == struct.pack("=IIQ", 0x800001, 0, 42)
    assert programs.kernel_dev(0x803) == (8 << 20) | 3  # userspace 8:3 -> kernel encoding
    icmp = programs.flow_key(4, 1, b"\1\2\3\4", b"\5\6\7\10", 99, 100)
    assert icmp[4:8] == b"\0\0\0\0"  # ports are only read for TCP and UDP
