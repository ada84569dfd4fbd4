"""Role and crate rules, one line each."""

from __future__ import annotations

import pytest

from egress_monitor.events import ExecInfo
from egress_monitor.roles import Crate, Role, classify, crate_of, program_name, starts_build


def info(exe: str | None, *argv: str, **env: str) -> ExecInfo:
    return ExecInfo(exe=exe, argv=argv, cargo_env=tuple(env.items()))


@pytest.mark.parametrize("exe, argv, env, parent, role", [
    ("/x/build/a-0123456789abcdef/build-script-build", (), {}, Role.CARGO, Role.BUILD_SCRIPT),
    ("/x/build/ort-sys-0123456789abcdef/build-script-main", (), {}, Role.CARGO,
     Role.BUILD_SCRIPT),
    ("/usr/bin/rustc", (), {}, Role.CARGO, Role.RUSTC),
    ("/usr/bin/rustdoc", (), {}, Role.CARGO, Role.RUSTC),
    ("/usr/bin/clippy-driver", (), {}, Role.CARGO, Role.RUSTC),
    ("/usr/bin/sccache", ("sccache", "/usr/bin/rustc", "-"), {"CARGO_PKG_NAME": "a"},
     Role.CARGO, Role.RUSTC),
    ("/usr/bin/cargo", (), {}, None, Role.CARGO),
    ("/root/.cargo/bin/cargo-nextest", (), {}, Role.CARGO, Role.CARGO),
    ("/w/target/debug/deps/a-0123456789abcdef", (), {"CARGO_PKG_NAME": "a"}, Role.CARGO,
     Role.CRATE_BINARY),
    ("/usr/bin/git", (), {}, Role.CARGO, Role.CARGO),
    ("/usr/bin/cc", (), {}, Role.RUSTC, Role.RUSTC),
    ("/usr/bin/rustc", (), {}, Role.BUILD_SCRIPT, Role.BUILD_SCRIPT),
    ("/usr/bin/cargo", (), {}, Role.CRATE_BINARY, Role.CRATE_BINARY),
    ("/usr/bin/make", (), {}, None, Role.OTHER),
    ("/usr/bin/python3", (), {"CARGO_PKG_NAME": "a"}, Role.RUSTC, Role.RUSTC),
])
def test_classify(exe: str, argv: tuple[str, ...], env: dict[str, str], parent: Role | None,
                  role: Role) -> None:
    assert classify(info(exe, *argv, **env), parent) is role


def test_rustup_proxy_is_named_by_argv0() -> None:
    proxy = info("/root/.cargo/bin/rustup", "cargo", "build")
    assert program_name(proxy) == "cargo" and starts_build(proxy)
    assert program_name(info("/root/.cargo/bin/rustup", "rustup", "update")) == "rustup"
    assert program_name(info(None, "/opt/build-script-build")) == "build-script-build"
    assert program_name(info("/tmp/x (deleted)")) == "x"


def test_crates() -> None:
    script = info("/t/debug/build/ring-0123456789abcdef/build-script-build",
                  CARGO_PKG_NAME="ring", CARGO_PKG_VERSION="0.17.8")
    assert crate_of(script, Role.BUILD_SCRIPT, None, Role.CARGO) == Crate("ring", "0.17.8")
    bare = info("/t/debug/build/ring-0123456789abcdef/build-script-build")
    assert crate_of(bare, Role.BUILD_SCRIPT, None, Role.CARGO) == Crate("ring", None)
    rustc = info("/usr/bin/rustc", "rustc", "--crate-name", "serde_derive")
    assert crate_of(rustc, Role.RUSTC, None, Role.CARGO) == Crate("serde_derive", None)
    test_bin = info("/t/debug/deps/mylib-0123456789abcdef")
    assert crate_of(test_bin, Role.CRATE_BINARY, None, Role.CARGO) == Crate("mylib", None)
    curl = info("/usr/bin/curl", CARGO_PKG_NAME="ignored")
    assert crate_of(curl, Role.BUILD_SCRIPT, Crate("ring", "1"), Role.BUILD_SCRIPT) == \
        Crate("ring", "1")
    assert crate_of(info("/usr/bin/git"), Role.CARGO, None, Role.CARGO) is None
