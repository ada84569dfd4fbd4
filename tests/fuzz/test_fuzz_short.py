"""The fuzz suite inside ``make test``: a short deterministic run of every harness, and every
saved regression input replayed (see README.md here)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from tests.fuzz.run import REGRESSIONS, harness_names, is_yaml, load, regressions, run_one

BINARY_INPUTS = 10_000
YAML_INPUTS = 1_500
SLOW_S = 0.5


@pytest.mark.parametrize("name", harness_names())
def test_short_run_finds_nothing(name: str, tmp_path: Path) -> None:
    inputs = YAML_INPUTS if is_yaml(load(name)) else BINARY_INPUTS
    report = run_one(name, inputs, seed=0, slow=SLOW_S, save_dir=tmp_path)
    assert report.inputs == inputs, f"the run stopped early: {report}"
    assert not report.crashes, (
        f"{name}: inputs outside the documented errors: {report.crashes}; the inputs are in "
        f"{report.saved} (copy them to tests/fuzz/regressions/{name}/ once fixed)")


def _cases() -> list[Path]:
    return regressions()


@pytest.mark.parametrize("path", _cases(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_regression_input(path: Path) -> None:
    module = load(path.parent.name)
    data = path.read_bytes()
    started = time.perf_counter()
    with contextlib.suppress(module.ALLOWED):  # the documented error is a total answer
        module.target(data)
    elapsed = time.perf_counter() - started
    assert elapsed < SLOW_S, f"{path.name} took {elapsed:.3f} s"


def test_every_regression_folder_names_a_harness() -> None:
    names = set(harness_names())
    folders = {p.name for p in REGRESSIONS.iterdir() if p.is_dir()}
    assert folders <= names, f"regressions for no harness: {folders - names}"
    assert _cases(), "no regression inputs: the ones found on f874a56 are kept here"
