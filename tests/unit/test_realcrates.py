"""The real-crate workspace generator and its checks (bench/realcrates.py), without cargo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import realcrates


def _ran(target: Path, *dirs: str) -> None:
    for d in dirs:
        path = target / "debug" / "build" / d
        path.mkdir(parents=True)
        (path / "output").write_text("cargo:rustc-cfg=x\n")


def test_ground_truth_is_the_output_file_cargo_writes(tmp_path: Path) -> None:
    target = tmp_path / "target"
    _ran(target, "libz-sys-01a5b6dfe1be7ace", "serde_json-60fdb5400b3163aa")
    # The directory of a compiled but not yet run build script has no output file.
    (target / "debug" / "build" / "ring-48666e629d47d736").mkdir(parents=True)
    # Not a cargo hash: not a package's build directory.
    (target / "debug" / "build" / "odd-name").mkdir()
    (target / "debug" / "build" / "odd-name" / "output").write_text("")
    assert realcrates.ran_build_scripts(target) == {"libz-sys", "serde_json"}


def _end(ws: Path, scripts: list[str], **summary: Any) -> dict[str, Any]:
    return {"type": "build_end", "build": {"id": "b", "cwd": str(ws)},
            "summary": {"build_scripts": scripts, "would_be_denied": 0,
                        "connections_by_role": {}, **summary}}


def test_problems(tmp_path: Path) -> None:
    ws, target = tmp_path / "ws", tmp_path / "target"
    _ran(target, "libz-sys-01a5b6dfe1be7ace", "serde_json-60fdb5400b3163aa")
    good = [_end(ws, ["libz-sys 1.1.8"]), _end(ws, ["serde-json 1.0.87"])]
    assert realcrates.problems(good, ws, target, builds=2) == []
    cases: list[tuple[list[dict[str, Any]], str]] = [
        (good[:1], "1 build_end records"),
        ([good[0], _end(ws, [])], "['serde-json']"),
        ([*good, {"type": "alert", "kind": "http_post", "evidence": {}}], "alert http_post"),
        ([*good, {"type": "connection", "decision": "deny", "dst": {"ip": "x"}}],
         "connection denied"),
        ([good[0], _end(ws, ["serde_json"], would_be_denied=1)], "would_be_denied 1"),
        ([good[0], _end(ws, ["serde_json"], connections_by_role={"rustc": {"deny": 2}})],
         "2 rustc denied"),
        # A build of another workspace counts for nothing.
        ([good[0], _end(tmp_path / "other", ["serde_json"])], "1 build_end records"),
    ]
    for events, expected in cases:
        found = realcrates.problems(events, ws, target, builds=2)
        assert any(expected in p for p in found), (expected, found)


def test_workspace_uses_the_debian_directory_source(tmp_path: Path) -> None:
    ws = realcrates.write_workspace(tmp_path / "ws", "small", registry=Path("/reg"))
    config = (ws / ".cargo" / "config.toml").read_text()
    assert 'replace-with = "debian"' in config and 'directory = "/reg"' in config
    assert (ws / "rm-macro" / "Cargo.toml").read_text().count("proc-macro = true") == 1
    assert (ws / "rm-shim" / "build.rs").exists()
    assert realcrates.missing_crates("full", registry=tmp_path / "none") == \
        realcrates.NEEDED["small"] + realcrates.NEEDED["full"]
