"""Which container a cgroup path names, if any (pure; total).

Container engines put each container in a cgroup whose name carries the engine and the
container's id; Kubernetes adds a pod cgroup above it. What is recognised (cgroup v2 paths as
``/proc/PID/cgroup``'s ``0::`` line gives them; v1 paths have the same shapes):

- docker: ``docker-<id>.scope`` (systemd driver), ``docker/<id>`` (cgroupfs driver);
- podman: ``libpod-<id>.scope`` (rootless too, below ``user@UID.service``),
  ``libpod_parent/libpod-<id>``;
- containerd: ``cri-containerd-<id>.scope``; crio: ``crio-<id>.scope``;
- a Kubernetes pod: ``kubepods...-pod<uid>.slice`` (systemd driver, the uid's dashes written
  as underscores) or ``kubepods/.../pod<uid>`` gives ``pod``; the container below it is the
  engine's scope, or a bare ``<id>`` (cgroupfs driver: runtime kubernetes).

An id is 64 lowercase hex digits, as every engine here makes them; the engines' monitor
cgroups (``libpod-conmon-<id>.scope``, ``crio-conmon-<id>.scope``) are therefore no
container. Nested containers (an engine inside a container) give the innermost. The path
comes from the kernel but its names below a delegated cgroup are chosen by whoever owns it
(a build can name a cgroup ``docker-<64 hex>.scope``): a container here is a *claim* for
reports and policy, not an identity to grant anything on.
"""

from __future__ import annotations

from dataclasses import dataclass

_HEX = frozenset("0123456789abcdef")
_SCOPES = (("docker-", "docker"), ("libpod-", "podman"), ("cri-containerd-", "containerd"),
           ("crio-", "crio"))
_PARENTS = {"docker": "docker", "libpod_parent": "podman"}  # cgroupfs drivers
MAX_PATH = 4096  # PATH_MAX: longer is not a path the kernel gave


@dataclass(frozen=True, slots=True)
class Container:
    """A container: ``runtime`` (docker, podman, containerd, crio, kubernetes), its ``id``
    (None: a process in a pod's cgroup but in no container's), the Kubernetes ``pod`` uid."""

    runtime: str
    id: str | None
    pod: str | None = None


def _is_id(text: str) -> bool:
    return len(text) == 64 and all(c in _HEX for c in text)


def _pod_uid(part: str) -> str | None:
    """The pod uid in ``kubepods-burstable-pod<uid>.slice`` (systemd driver: the uid's dashes
    written as underscores) or ``pod<uid>`` (cgroupfs driver)."""
    if part.endswith(".slice") and part.startswith("kubepods-"):
        tail = part[:-len(".slice")].rpartition("-")[2]
    else:
        tail = part
    if not tail.startswith("pod"):
        return None
    uid = tail[3:].replace("_", "-")
    if len(uid) == 36 and [len(g) for g in uid.split("-")] == [8, 4, 4, 4, 12]:
        ok = all(c in _HEX for c in uid.replace("-", ""))
    else:  # a static pod's uid is its config hash: 32 hex digits
        ok = len(uid) == 32 and all(c in _HEX for c in uid)
    return uid if ok else None


def _scope(part: str) -> tuple[str, str] | None:
    if not part.endswith(".scope"):
        return None
    for prefix, runtime in _SCOPES:
        if part.startswith(prefix) and _is_id(part[len(prefix):-len(".scope")]):
            return runtime, part[len(prefix):-len(".scope")]
    return None


def container_of(path: str) -> Container | None:
    """The innermost container the cgroup ``path`` names, or None. Never raises."""
    if not isinstance(path, str) or len(path) > MAX_PATH:
        return None
    parts = [p for p in path.split("/") if p]
    found: tuple[str, str] | None = None
    pod: str | None = None
    in_kubepods = False
    for i, part in enumerate(parts):
        prev = parts[i - 1] if i else ""
        in_kubepods = in_kubepods or part == "kubepods" or part.startswith("kubepods.") \
            or part.startswith("kubepods-")
        uid = _pod_uid(part) if in_kubepods else None
        if uid is not None:
            pod, found = uid, None  # a container above a pod is not this pod's
            continue
        hit = _scope(part)
        if hit is None and prev in _PARENTS and _is_id(part):
            hit = _PARENTS[prev], part
        if hit is None and prev == "libpod_parent" and part.startswith("libpod-") \
                and _is_id(part[len("libpod-"):]):
            hit = "podman", part[len("libpod-"):]
        if hit is None and pod is not None and _pod_uid(prev) is not None and _is_id(part):
            hit = "kubernetes", part
        if hit is not None:
            found = hit
    if found is not None:
        return Container(found[0], found[1], pod)
    if pod is not None:
        return Container("kubernetes", None, pod)
    return None
