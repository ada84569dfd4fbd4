"""A proc macro on the bundled indicator list, vendored into a workspace: found by the build's
rustc before the macro ever runs, and by ``scan``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.netlab import REPO, DaemonHandle, env_with_cargo

MACRO = """use proc_macro::TokenStream;
#[proc_macro_derive(Hello)]
pub fn hello(_input: TokenStream) -> TokenStream {
    // What the malicious macro would do, as a witness: it ran at compile time.
    if let Ok(path) = std::env::var("EM_MACRO_RAN") { std::fs::write(path, "ran").ok(); }
    TokenStream::new()
}
"""


def vendored_workspace(root: Path) -> Path:
    """``app`` using the derive of ``proc-macro1`` 0.1.1, vendored as ``cargo vendor`` lays
    crates out (with ``.cargo-checksum.json``)."""
    macro = root / "vendor" / "proc-macro1"
    (macro / "src").mkdir(parents=True)
    (macro / "Cargo.toml").write_text('[package]\nname = "proc-macro1"\nversion = "0.1.1"\n'
                                      'edition = "2021"\n\n[lib]\nproc-macro = true\n')
    (macro / "src" / "lib.rs").write_text(MACRO)
    (macro / ".cargo-checksum.json").write_text('{"files":{},"package":null}')
    (root / "app" / "src").mkdir(parents=True)
    (root / "app" / "Cargo.toml").write_text(
        '[package]\nname = "app"\nversion = "1.0.0"\nedition = "2021"\n\n[dependencies]\n'
        'proc-macro1 = { path = "../vendor/proc-macro1" }\n')
    (root / "app" / "src" / "main.rs").write_text(
        "#[derive(proc_macro1::Hello)]\nstruct S;\nfn main() {}\n")
    (root / "Cargo.toml").write_text('[workspace]\nmembers = ["app"]\nresolver = "2"\n')
    return root


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_a_listed_proc_macro_is_caught_when_rustc_compiles_it(
        daemon: DaemonHandle, tmp_path: Path, mode: str) -> None:
    iocs = REPO / "policies" / "iocs.yaml"  # the bundled list, as shipped
    daemon.restart("--iocs", str(iocs), policy=f"version: 1\nmode: {mode}\n"
                   "known_bad_crates: kill-build\n")
    ws = vendored_workspace(tmp_path / "ws")
    witness = tmp_path / "macro-ran"
    env = {**env_with_cargo(), "CARGO_TARGET_DIR": str(ws / "target"),
           "EM_MACRO_RAN": str(witness)}
    cargo = shutil.which("cargo", path=env["PATH"])
    assert cargo is not None
    result = subprocess.run([cargo, "build", "--offline", "-q"], cwd=ws, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    alert = daemon.wait_event("the known_bad_crate alert", lambda e: e["type"] == "alert"
                              and e["kind"] == "known_bad_crate")
    ev = alert["evidence"]
    assert (ev["crate"], ev["version"], ev["stage"], alert["role"]) == \
        ("proc-macro1", "0.1.1", "compile", "rustc")
    assert "RUSTSEC-2026-0265" in ev["why"]
    if mode == "enforce":
        assert result.returncode != 0 and ev["build_killed"] is True
        assert not witness.exists()  # killed while compiling: the macro never ran
    else:
        assert result.returncode == 0, result.stderr
        assert ev["build_killed"] is False and witness.read_text() == "ran"

    scan = subprocess.run([sys.executable, "-m", "egress_monitor.cli", "scan", str(ws),
                           "--no-registry", "--iocs", str(iocs), "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    report = json.loads(scan.stdout)
    assert scan.returncode == 1
    # the lock file cargo wrote pins it, and the vendored tree holds it
    assert sorted((Path(f["path"]).name, f["name"], f["version"], "vendored" in f["why"])
                  for f in report["findings"]) == [
        ("Cargo.lock", "proc-macro1", "0.1.1", False), ("Cargo.toml", "proc-macro1", "0.1.1",
                                                        True)]
    assert report["examined"]["lockfiles"] == 1 and report["examined"]["crates"] >= 3
