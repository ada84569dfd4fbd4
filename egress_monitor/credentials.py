"""Credential reads by build code: which opens count, and the watch that answers them.

A build's credential files are the policy's ``credential_reads.paths`` under the build's
``$HOME`` (the root process's, read at the build's start): by default ``.ssh/``, ``.aws/``,
``.config/gcloud/``, ``.azure/``, ``.kube/config``, ``.docker/config.json``, ``.netrc``,
``.git-credentials``, ``.cargo/credentials.toml`` and ``.cargo/credentials``. An open of one
by build code (roles ``rustc``, ``build-script``, ``crate-binary``, which includes everything a
build script or test starts) raises ``credential_read`` with the path, process, role and crate
(never the content), and in enforce mode is refused (``open`` fails with EPERM) while the
build goes on. cargo reading its own credentials is cargo's job, not build code; a crate in
``credential_reads.except_crates`` is left alone.

The kernel asks through fanotify permission events (``sources/fanotify.py``): each marked
directory (and each of its subdirectories, as they are at the build's start) and each marked
file that exists. Files that appear later in an unmarked place are not seen.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

from egress_monitor.alerts import Alert, raise_alert
from egress_monitor.builds import Build
from egress_monitor.detect.secrets import MAX_FILE
from egress_monitor.policy.schema import Policy
from egress_monitor.process_tree import Node
from egress_monitor.roles import Role
from egress_monitor.sources.fanotify import Fanotify, OpenEvent

log = logging.getLogger(__name__)
BUILD_CODE = frozenset({Role.RUSTC, Role.BUILD_SCRIPT, Role.CRATE_BINARY})
MAX_MARKED_DIRS = 256


def home_of(environ: bytes) -> str | None:
    """``$HOME`` of a raw environment, resolved (None when unset or not absolute)."""
    for item in environ.split(b"\0"):
        if item.startswith(b"HOME="):
            home = item[5:].decode("utf-8", "surrogateescape")
            return os.path.realpath(home) if home.startswith("/") else None
    return None


def credential_of(path: str, home: str, paths: tuple[str, ...]) -> str | None:
    """The entry of ``paths`` that ``path`` (absolute, resolved) falls under in ``home``."""
    rel = os.path.relpath(path, home)
    if rel.startswith(".."):
        return None
    for entry in paths:
        if (entry.endswith("/") and (rel + "/").startswith(entry)) or rel == entry.rstrip("/"):
            return entry
    return None


def judge(node: Node | None, path: str, home: str, policy: Policy) -> str | None:
    """The credential entry an open is a read of, when it is build code's; else None."""
    if node is None or node.role not in BUILD_CODE:
        return None
    if node.crate is not None and \
            node.crate.name.replace("-", "_") in policy.credential_except_crates:
        return None
    return credential_of(path, home, policy.credential_paths)


class CredentialWatch:
    """Marks per build home, and the answer to every open the kernel asks about."""

    def __init__(self, *, source: Fanotify | None, node_of: Callable[[int], Node | None],
                 emit: Callable[[Alert], None], policy: Callable[[], Policy],
                 enforce: Callable[[], bool], wall: Callable[[], float],
                 path_of: Callable[[OpenEvent], str | None] = Fanotify.path_of,
                 learn: Callable[[Build, str, bytes], None] | None = None) -> None:
        self.source = source
        self._learn = learn
        self._path_of = path_of
        self._node_of = node_of
        self._emit = emit
        self._policy = policy
        self._enforce = enforce
        self._wall = wall
        self._homes: dict[str, tuple[int, list[tuple[str, bool]]]] = {}  # refs, marks
        self._build_home: dict[str, str] = {}

    def build_started(self, build: Build, environ: bytes) -> None:
        """Mark the credential files under the build's ``$HOME``."""
        home = home_of(environ)
        if self.source is None or home is None or build.id in self._build_home:
            return
        self._build_home[build.id] = home
        refs, marks = self._homes.get(home, (0, []))
        if refs == 0:
            marks = self._mark(home)
        self._homes[home] = (refs + 1, marks)

    def _mark(self, home: str) -> list[tuple[str, bool]]:
        assert self.source is not None
        marks: list[tuple[str, bool]] = []
        for entry in self._policy().credential_paths:
            target = os.path.normpath(os.path.join(home, entry))
            if entry.endswith("/"):
                for dirpath, dirs, _files in os.walk(target):
                    dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(dirpath, d))]
                    marks.append((dirpath, True))
                    if len(marks) >= MAX_MARKED_DIRS:
                        break
            elif os.path.isfile(target):
                marks.append((target, False))
        done = []
        for path, directory in marks:
            try:
                self.source.mark(path, directory)
                done.append((path, directory))
            except OSError as exc:
                log.warning("credential reads: cannot watch %s: %s", path, exc)
        return done

    def build_ended(self, build: Build) -> None:
        """Unmark the build's home when no other build uses it."""
        home = self._build_home.pop(build.id, None)
        if home is None or home not in self._homes or self.source is None:
            return
        refs, marks = self._homes[home]
        if refs > 1:
            self._homes[home] = (refs - 1, marks)
            return
        del self._homes[home]
        for path, directory in marks:
            with contextlib.suppress(OSError):  # gone with its directory: nothing to unmark
                self.source.unmark(path, directory)

    def handle(self) -> None:
        """Answer every pending open: allowed unless enforce mode refuses build code's."""
        if self.source is None:
            return
        for event in self.source.read():
            allow = True
            try:
                allow = self._judge(event.pid, self._path_of(event), event.fd)
            finally:
                self.source.respond(event, allow)

    def _judge(self, pid: int, path: str | None, fd: int = -1) -> bool:
        node = self._node_of(pid)
        build = node.build if node is not None else None
        home = self._build_home.get(build.id) if build is not None else None
        if path is None or node is None or build is None or home is None:
            return True
        entry = judge(node, path, home, self._policy())
        if entry is None:
            return True
        refuse = self._enforce()
        if not refuse and self._learn is not None:
            self._learn_values(build, os.path.relpath(path, home), fd)
        self._emit(raise_alert(wall=self._wall(), kind="credential_read", severity="critical",
                               rule="credential_reads", blocked=refuse, owner=node,
                               build=build, evidence={"path": path, "credential": entry}))
        return not refuse

    def _learn_values(self, build: Build, label: str, fd: int) -> None:
        """Read what the build is about to read, through the kernel's own fd for this open
        (never the path again: no race), so what it sends of it is recognised later."""
        assert self._learn is not None
        try:
            content = os.pread(fd, MAX_FILE, 0)
        except OSError:
            return  # a directory, or gone: nothing to learn
        self._learn(build, label, content)

    def close(self) -> None:
        """Close the group (the kernel allows whatever still waits)."""
        if self.source is not None:
            self.source.close()
            self.source = None
