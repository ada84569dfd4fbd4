"""The provenance table (egress_monitor.provenance): roles only go down, names never lift."""

from __future__ import annotations

import pytest

from egress_monitor.events import ExecInfo
from egress_monitor.provenance import (
    FILE_CARGO,
    FILE_OTHER,
    FILE_RUNNER,
    FILE_RUSTC,
    FILE_TOOL,
    K_CARGO,
    K_CRATE,
    K_NONE,
    K_RUSTC,
    KernelExec,
    Runner,
    build_script_crate,
    capped,
    classify,
    compiled_build_script,
    mirror,
)
from egress_monitor.roles import Crate, Role

BS = "/w/target/debug/build/ring-0123456789abcdef/build-script-build"
TEST = "/w/target/debug/deps/mycrate-0123456789abcdef"


def info(exe: str | None = None, argv: tuple[str, ...] = (), **env: str) -> ExecInfo:
    return ExecInfo(exe=exe, argv=argv, cargo_env=tuple(env.items()))


@pytest.mark.parametrize(("k", "inf", "prior", "role", "crate"), [
    # the kernel says cargo: cargo, whatever the file is called
    (KernelExec(K_CARGO, K_NONE, True, "/x/bin/cargo"), info("/x/bin/cargo"), None,
     Role.CARGO, None),
    # cargo ran a build script: role and crate from the path cargo wrote
    (KernelExec(K_CRATE, K_CARGO, False, BS), info(BS, CARGO_PKG_NAME="ring",
                                                   CARGO_PKG_VERSION="0.16.20"),
     Role.CARGO, Role.BUILD_SCRIPT, Crate("ring", "0.16.20")),
    # ... a CARGO_PKG_NAME naming another crate gets neither that name nor a version
    (KernelExec(K_CRATE, K_CARGO, False, BS), info(BS, CARGO_PKG_NAME="victim",
                                                   CARGO_PKG_VERSION="9"),
     Role.CARGO, Role.BUILD_SCRIPT, Crate("ring", None)),
    # cargo ran a test binary
    (KernelExec(K_CRATE, K_CARGO, False, TEST), info(TEST), Role.CARGO, Role.CRATE_BINARY,
     Crate("mycrate", None)),
    # cargo ran a subcommand or `cargo run` target named cargo-x: crate code, not cargo
    (KernelExec(K_CRATE, K_CARGO, False, "/w/target/debug/cargo-x"),
     info("/w/target/debug/cargo-x", CARGO_PKG_NAME="x"), Role.CARGO, Role.CRATE_BINARY,
     Crate("x", None)),
    # crate code running anything (a copy of curl named cargo, build-script-build with an
    # environment naming a crate with an exception) keeps its role and crate
    (KernelExec(K_CRATE, K_CRATE, False, "/tmp/cargo"), info("/tmp/cargo"), Role.BUILD_SCRIPT,
     Role.BUILD_SCRIPT, Crate("evil", "1")),
    (KernelExec(K_CRATE, K_CRATE, False, BS), info(BS, CARGO_PKG_NAME="ring"),
     Role.BUILD_SCRIPT, Role.BUILD_SCRIPT, Crate("evil", "1")),
    # the compiler: crate from the argv cargo wrote
    (KernelExec(K_RUSTC, K_CARGO, False, "/t/bin/rustc"),
     info("/t/bin/rustc", ("rustc", "--crate-name", "serde")), Role.CARGO, Role.RUSTC,
     Crate("serde", None)),
    # below the compiler (a proc macro's child) it stays the compiler's, with its crate
    (KernelExec(K_RUSTC, K_RUSTC, False, "/usr/bin/curl"),
     info("/usr/bin/curl", ("curl", "--crate-name", "victim")), Role.RUSTC, Role.RUSTC,
     Crate("evil", "1")),
    # adopted by `egress-monitor exec` with no cargo yet
    (KernelExec(K_NONE, K_NONE, False, "/bin/sh"), info("/bin/sh"), None, Role.OTHER, None),
    # crate code of an origin nobody saw: the lowest role
    (KernelExec(K_CRATE, K_CRATE, False, "/bin/sh"), info("/bin/sh"), Role.CARGO, Role.OTHER,
     None),
    # no record: sticky parents keep theirs, anything else is other
    (None, info("/bin/sh"), Role.BUILD_SCRIPT, Role.BUILD_SCRIPT, Crate("evil", "1")),
    (None, info("/bin/sh"), Role.CARGO, Role.OTHER, None),
])
def test_table(k: KernelExec | None, inf: ExecInfo, prior: Role | None, role: Role,
               crate: Crate | None) -> None:
    parent_crate = Crate("evil", "1") if prior in (Role.BUILD_SCRIPT, Role.RUSTC) else None
    got = classify(k, inf, prior, parent_crate)
    assert (got.role, got.crate) == (role, crate)
    assert got.basis


def test_role_before_unknown_uses_the_trees_prior_role() -> None:
    k = KernelExec(K_CRATE, None, False, BS)
    assert classify(k, info(BS), Role.CARGO, None).role is Role.BUILD_SCRIPT
    assert classify(k, info(BS), Role.CRATE_BINARY, Crate("t")).crate == Crate("t")


@pytest.mark.parametrize(("path", "name"), [
    (BS, "ring"),
    ("/w/target/release/build/libz-sys-0123456789abcdef/build-script-main", "libz-sys"),
    ("/w/target/debug/build/ring-0123456789abcdef/not-a-build-script", None),
    ("/w/target/debug/elsewhere/ring-0123456789abcdef/build-script-build", None),
    ("/w/target/debug/build/ring-nothex/build-script-build", None),
    ("build-script-build", None),
])
def test_build_script_crate(path: str, name: str | None) -> None:
    assert build_script_crate(path) == name


@pytest.mark.parametrize(("kind", "before", "in_build", "role", "started"), [
    (FILE_CARGO, None, False, K_CARGO, True),
    (FILE_OTHER, None, False, None, False),
    (FILE_RUSTC, Role.CARGO, True, K_RUSTC, False),
    (FILE_TOOL, Role.CARGO, True, K_CARGO, False),
    (FILE_OTHER, Role.CARGO, True, K_CRATE, False),
    (FILE_CARGO, Role.BUILD_SCRIPT, True, K_CRATE, False),
    (FILE_CARGO, Role.RUSTC, True, K_RUSTC, False),
    (FILE_CARGO, Role.OTHER, True, K_CARGO, False),
    # a build-script runner is a cargo file to the kernel
    (FILE_RUNNER, None, False, K_CARGO, True),
    (FILE_RUNNER, Role.CARGO, True, K_CARGO, False),
    (FILE_RUNNER, Role.OTHER, True, K_CARGO, False),
    (FILE_RUNNER, Role.BUILD_SCRIPT, True, K_CRATE, False),
    (FILE_RUNNER, Role.RUSTC, True, K_RUSTC, False),
])
def test_mirror_follows_the_kernel_table(kind: int, before: Role | None, in_build: bool,
                                         role: int | None, started: bool) -> None:
    got = mirror(kind, before, in_build)
    assert (got.role if got else None) == role
    assert (got.started if got else False) == started


def test_crate_code_never_rises_again() -> None:
    """Once crate code (or of unknown origin), real cargo or the compiler run by it, or a
    record that says otherwise, gives nothing more: the ceiling holds, and is inherited."""
    from egress_monitor.provenance import K_CARGO as CARGO_CEILING
    from egress_monitor.provenance import capped
    cargo = classify(KernelExec(K_CARGO, K_NONE, True, "/t/cargo"), info("/t/cargo"), None, None)
    held = capped(cargo, K_CRATE, Role.BUILD_SCRIPT, Crate("evil", "1"))
    assert (held.role, held.crate, held.ceiling) == (Role.BUILD_SCRIPT, Crate("evil", "1"),
                                                     K_CRATE)
    unknown = classify(KernelExec(K_CRATE, K_CRATE, False, "/bin/sh"), info("/bin/sh"),
                       Role.CARGO, None)
    assert unknown.ceiling == K_CRATE
    assert capped(cargo, unknown.ceiling, Role.OTHER, None).role is Role.OTHER
    rustc = classify(KernelExec(K_RUSTC, K_CARGO, False, "/t/rustc"),
                     info("/t/rustc", ("rustc", "--crate-name", "x")), Role.CARGO, None)
    assert capped(rustc, CARGO_CEILING, Role.CARGO, None).ceiling == K_RUSTC
    assert capped(cargo, K_RUSTC, Role.RUSTC, Crate("x")).role is Role.RUSTC
    # an adopted launcher (no role yet) may still become cargo
    adopted = classify(KernelExec(K_NONE, K_NONE), info("/bin/sh"), None, None)
    assert capped(adopted, CARGO_CEILING, None, None).ceiling == CARGO_CEILING


RUNNER = "/bazel/out/bin/cargo_build_script_runner/runner"
SCRIPT = "/bazel/out/bin/external/ring/ring_bs_build_script_"


def test_mirror_names_a_runner_only_where_it_is_cargo() -> None:
    started = mirror(FILE_RUNNER, None, False, RUNNER)
    assert started is not None and started.runner == RUNNER
    assert mirror(FILE_RUNNER, Role.BUILD_SCRIPT, True, RUNNER).runner is None  # type: ignore[union-attr]
    assert mirror(FILE_CARGO, None, False, RUNNER).runner is None  # type: ignore[union-attr]


@pytest.mark.parametrize(("runner_env", "script_env", "crate"), [
    # the crate is the one the build system gave the runner, whatever the script's own
    ({"CARGO_PKG_NAME": "ring", "CARGO_PKG_VERSION": "0.17.8"},
     {"CARGO_PKG_NAME": "victim", "CARGO_PKG_VERSION": "1.0.0"}, Crate("ring", "0.17.8")),
    ({"CARGO_PKG_NAME": "ring"}, {}, Crate("ring", None)),
    # a runner whose environment names no crate: a build script of no crate
    ({}, {"CARGO_PKG_NAME": "victim"}, None),
])
def test_what_a_runner_runs_is_a_build_script_of_the_runners_crate(
        runner_env: dict[str, str], script_env: dict[str, str], crate: Crate | None) -> None:
    runner = classify(KernelExec(K_CARGO, K_NONE, True, RUNNER, RUNNER),
                      ExecInfo(RUNNER, cargo_env=tuple(runner_env.items())), None, None)
    assert (runner.role, runner.crate) == (Role.CARGO, None)
    assert runner.runner == Runner(RUNNER, crate)
    assert f"configured build-script runner {RUNNER}" in runner.basis
    # its child execs the script (named as Bazel names them, not build-script-*)
    script = classify(KernelExec(K_CRATE, K_CARGO, False, SCRIPT),
                      ExecInfo(SCRIPT, cargo_env=tuple(script_env.items())), Role.CARGO, None,
                      runner.runner)
    assert (script.role, script.crate, script.runner) == (Role.BUILD_SCRIPT, crate, None)
    assert RUNNER in script.basis and SCRIPT in script.basis
    # the runner's kept through capped, what is below the script keeps its role and crate
    assert capped(runner, K_CARGO, None, None).runner == runner.runner
    below = classify(KernelExec(K_CRATE, K_CRATE, False, "/bin/sh"),
                     info("/bin/sh", CARGO_PKG_NAME="victim"), script.role, script.crate)
    assert (below.role, below.crate) == (Role.BUILD_SCRIPT, crate)


def test_crate_code_running_the_runner_gains_nothing() -> None:
    """The kernel keeps crate code crate code when it execs the runner; a record that says
    cargo anyway (membership lost) is held at the ceiling, and no runner is left."""
    kept = classify(KernelExec(K_CRATE, K_CRATE, False, RUNNER), info(RUNNER,
                                                                      CARGO_PKG_NAME="victim"),
                    Role.BUILD_SCRIPT, Crate("evil", "1"))
    assert (kept.role, kept.crate, kept.runner) == (Role.BUILD_SCRIPT, Crate("evil", "1"), None)
    lifted = classify(KernelExec(K_CARGO, K_NONE, True, RUNNER, RUNNER),
                      info(RUNNER, CARGO_PKG_NAME="victim"), Role.BUILD_SCRIPT,
                      Crate("evil", "1"))
    held = capped(lifted, K_CRATE, Role.BUILD_SCRIPT, Crate("evil", "1"))
    assert (held.role, held.crate, held.runner) == (Role.BUILD_SCRIPT, Crate("evil", "1"), None)
    # real cargo's children are judged by their paths as before, not as a runner's
    assert classify(KernelExec(K_CRATE, K_CARGO, False, SCRIPT), info(SCRIPT), Role.CARGO,
                    None).role is Role.CRATE_BINARY


BS_DIR = "/w/target/debug/build/ring-0123456789abcdef"


@pytest.mark.parametrize(("argv", "env", "want"), [
    (("rustc", "--crate-name", "build_script_build", "build.rs", "--out-dir", BS_DIR),
     {"CARGO_PKG_NAME": "ring", "CARGO_PKG_VERSION": "0.17.8"},
     (BS_DIR, Crate("ring", "0.17.8"))),
    # a RUSTC_WRAPPER's argv, the = form, a trailing slash; build_script_main (build = ...)
    (("sccache", "rustc", "--crate-name=build_script_main", f"--out-dir={BS_DIR}/"),
     {"CARGO_PKG_NAME": "ring"}, (BS_DIR, Crate("ring", None))),
    # not a build script's compile, or an out-dir of another package, or no package
    (("rustc", "--crate-name", "ring", "--out-dir", BS_DIR), {"CARGO_PKG_NAME": "ring"}, None),
    (("rustc", "--crate-name", "build_script_build", "--out-dir", BS_DIR),
     {"CARGO_PKG_NAME": "victim"}, None),
    (("rustc", "--crate-name", "build_script_build", "--out-dir", "/w/target/debug/deps"),
     {"CARGO_PKG_NAME": "ring"}, None),
    (("rustc", "--crate-name", "build_script_build", "--out-dir", BS_DIR), {}, None),
    (("rustc", "--crate-name", "build_script_build", "--out-dir"), {"CARGO_PKG_NAME": "ring"},
     None),
])
def test_compiled_build_script(argv: tuple[str, ...], env: dict[str, str],
                               want: tuple[str, Crate] | None) -> None:
    assert compiled_build_script(ExecInfo("/t/rustc", argv, cargo_env=tuple(env.items()))) \
        == want


def test_the_compiler_cargo_ran_says_what_it_compiled() -> None:
    argv = ("rustc", "--crate-name", "build_script_build", "--out-dir", BS_DIR)
    compiler = classify(KernelExec(K_RUSTC, K_CARGO, False, "/t/rustc"),
                        info("/t/rustc", argv, CARGO_PKG_NAME="ring", CARGO_PKG_VERSION="1"),
                        Role.CARGO, None)
    assert compiler.compiled == (BS_DIR, Crate("ring", "1"))
    assert capped(compiler, K_CARGO, Role.CARGO, None).compiled == compiler.compiled
    # below the compiler (a proc macro running rustc) says nothing
    below = classify(KernelExec(K_RUSTC, K_RUSTC, False, "/t/rustc"),
                     info("/t/rustc", argv, CARGO_PKG_NAME="ring", CARGO_PKG_VERSION="9"),
                     Role.RUSTC, Crate("x"))
    assert below.compiled is None


@pytest.mark.parametrize(("env", "compiled", "version", "from_compile"), [
    # the build script's own environment, read in time, names its package: that
    ({"CARGO_PKG_NAME": "ring", "CARGO_PKG_VERSION": "0.17.8"}, {BS_DIR: Crate("ring", "9")},
     "0.17.8", False),
    # gone before /proc was read, or exec'd into something naming another package: the
    # compile's
    ({}, {BS_DIR: Crate("ring", "0.17.8")}, "0.17.8", True),
    ({"CARGO_PKG_NAME": "victim", "CARGO_PKG_VERSION": "1"}, {BS_DIR: Crate("ring", "0.17.8")},
     "0.17.8", True),
    # a compile of another package into that directory never gives its version
    ({}, {BS_DIR: Crate("victim", "1")}, None, False),
    ({}, {}, None, False),
])
def test_a_build_scripts_version_from_its_compile(env: dict[str, str],
                                                  compiled: dict[str, Crate],
                                                  version: str | None,
                                                  from_compile: bool) -> None:
    got = classify(KernelExec(K_CRATE, K_CARGO, False, BS),
                   ExecInfo(None, cargo_env=tuple(env.items())), Role.CARGO, None,
                   compiled=compiled)
    assert (got.role, got.crate) == (Role.BUILD_SCRIPT, Crate("ring", version))
    assert got.basis.endswith("(version from its compile)") == from_compile
