"""Which files are a toolchain's cargo: the files whose exec starts a build in the kernel.

Only real cargo binaries count, never rustup's proxy (``~/.cargo/bin/cargo`` is a link to
``rustup``, which also stands behind ``rustc``; the proxy execs the toolchain's cargo, and
that exec is the one the kernel sees). Found in every rustup home given (each
``toolchains/*/bin/cargo``), the distribution's ``/usr/bin/cargo`` and configured paths.
Returns resolved paths of regular files, each once; never raises for a missing directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

DISTRIBUTION = ("/usr/bin/cargo", "/usr/local/bin/cargo")


def rustup_homes(env: dict[str, str], extra_homes: Iterable[str] = ()) -> list[Path]:
    """$RUSTUP_HOME, ``~/.rustup`` of $HOME, and any others given (e.g. each runner user's)."""
    homes = [Path(env["RUSTUP_HOME"])] if env.get("RUSTUP_HOME") else []
    if env.get("HOME"):
        homes.append(Path(env["HOME"]) / ".rustup")
    return homes + [Path(h) for h in extra_homes]


def cargo_files(homes: Iterable[Path], configured: Iterable[str] = (),
                distribution: Iterable[str] = DISTRIBUTION) -> list[str]:
    """Resolved paths of every toolchain cargo binary found (rustup's proxy excluded)."""
    candidates: list[Path] = []
    for home in homes:
        toolchains = home / "toolchains"
        try:
            names = sorted(os.listdir(toolchains))
        except OSError:
            continue
        candidates += [toolchains / name / "bin" / "cargo" for name in names]
    candidates += [Path(p) for p in (*distribution, *configured)]
    out: list[str] = []
    for path in candidates:
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if real.is_file() and real.name != "rustup" and str(real) not in out:
            out.append(str(real))
    return out
