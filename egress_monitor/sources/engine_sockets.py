"""Where container engines listen and which files are their CLIs, read from this host.

:func:`find_sockets` expands the configured socket paths (globs for per-user engines) to
the sockets that exist, each with its file identity; :func:`cli_files` finds the container
CLIs on ``$PATH`` and in the usual directories by identity; :func:`resolve_as` resolves a
path a process gave the kernel as that process would (its root and cwd, while it lives).
These read the filesystem and ``/proc``: the decisions on what they return are in
``egress_monitor/engines.py``.
"""

from __future__ import annotations

import glob
import os
import stat
from dataclasses import dataclass

Identity = tuple[int, int]  # (st_dev, st_ino)

DEFAULT_SOCKETS = (
    "/var/run/docker.sock", "/run/docker.sock", "/run/podman/podman.sock",
    "/run/containerd/containerd.sock", "/run/buildkit/buildkitd.sock",
    "/run/user/*/podman/podman.sock", "/run/user/*/docker.sock",
    "/run/user/*/containerd/containerd.sock", "/run/user/*/buildkit/buildkitd.sock")
CLI_NAMES = ("docker", "podman", "nerdctl", "buildah", "kubectl")
CLI_DIRS = ("/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin", "/usr/local/sbin")


@dataclass(frozen=True, slots=True)
class EngineSocket:
    """One engine socket found: the path it was found at, its resolved path, identity."""

    path: str
    real: str
    identity: Identity


def _identity(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def find_sockets(paths: tuple[str, ...]) -> list[EngineSocket]:
    """Every existing socket the paths (globs allowed) name, one per identity (the first
    path wins: ``/var/run`` and ``/run`` are usually the same directory)."""
    found: list[EngineSocket] = []
    seen: set[Identity] = set()
    for pattern in paths:
        for path in sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]:
            ident = _identity(path)
            if ident is not None and ident not in seen:
                seen.add(ident)
                found.append(EngineSocket(path, os.path.realpath(path), ident))
    return found


def cli_files(environ_path: str | None, names: tuple[str, ...] = CLI_NAMES
              ) -> dict[Identity, str]:
    """Identity -> name of each container CLI on ``environ_path`` and in :data:`CLI_DIRS`."""
    dirs = [*(environ_path or "").split(os.pathsep), *CLI_DIRS]
    out: dict[Identity, str] = {}
    for d in dirs:
        for name in names:
            if not d:
                continue
            try:
                st = os.stat(os.path.join(d, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.setdefault((st.st_dev, st.st_ino), name)
    return out


def file_identity(path: str | None) -> Identity | None:
    """A file's identity (any kind of file), None when it cannot be read."""
    if not path:
        return None
    try:
        st = os.stat(path.removesuffix(" (deleted)"))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def resolve_as(pid: int, path: str, proc_root: str = "/proc") -> Identity | None:
    """The socket identity ``path`` names for process ``pid``: relative to its cwd and
    under its root while it lives (``/proc/PID/cwd``, ``/proc/PID/root``); an absolute path
    of a process that is gone is resolved in our own root (a relative one cannot be)."""
    if not path:
        return None
    base = f"{proc_root}/{pid}"
    if path.startswith("/"):
        inside = _identity(f"{base}/root{path}")
        return inside if inside is not None else _identity(path)
    return _identity(f"{base}/cwd/{path}")
