"""Cgroup paths to containers: each engine's documented shapes, and what is not a container."""

from __future__ import annotations

import pytest

from egress_monitor.containers import Container, container_of

ID = "4f1c1b7bc3fb9a3e0c2f1f6f1b2a1d0e9f8e7d6c5b4a39281706f5e4d3c2b1a0"
ID2 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
UID = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"
UID_ = UID.replace("-", "_")
STATIC = "6d1e7c0a9b8f7e6d5c4b3a2918070605"


@pytest.mark.parametrize("path, want", [
    # docker: systemd driver, cgroupfs driver, docker-in-docker (the innermost)
    (f"/system.slice/docker-{ID}.scope", Container("docker", ID)),
    (f"/docker/{ID}", Container("docker", ID)),
    (f"/docker/{ID}/docker/{ID2}", Container("docker", ID2)),
    (f"/system.slice/docker-{ID}.scope/docker/{ID2}", Container("docker", ID2)),
    # podman: rootful, rootless, split cgroups (the container's own child), cgroupfs
    (f"/machine.slice/libpod-{ID}.scope", Container("podman", ID)),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope",
     Container("podman", ID)),
    (f"/machine.slice/libpod-{ID}.scope/container", Container("podman", ID)),
    (f"/libpod_parent/libpod-{ID}", Container("podman", ID)),
    # containerd and CRI-O, plain and under Kubernetes (systemd driver)
    (f"/system.slice/cri-containerd-{ID}.scope", Container("containerd", ID)),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
     f"cri-containerd-{ID}.scope", Container("containerd", ID, UID)),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope", Container("crio", ID, UID)),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
     f"docker-{ID}.scope", Container("docker", ID, UID)),
    # Kubernetes, cgroupfs driver: the pod, then a bare id; a static pod's hash uid
    (f"/kubepods/burstable/pod{UID}/{ID}", Container("kubernetes", ID, UID)),
    (f"/kubepods/pod{STATIC}/{ID}", Container("kubernetes", ID, STATIC)),
    # a process in the pod's cgroup itself, in no container
    (f"/kubepods.slice/kubepods-pod{UID_}.slice", Container("kubernetes", None, UID)),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope",
     Container("kubernetes", None, UID)),  # CRI-O's monitor: the pod's, no container's
])
def test_engines_shapes(path: str, want: Container) -> None:
    assert container_of(path) == want


@pytest.mark.parametrize("path", [
    "", "/", "/user.slice/user-1000.slice/session-2.scope", "/system.slice/docker.service",
    "/egress-monitor/build-q3",
    f"/machine.slice/libpod-conmon-{ID}.scope",  # podman's monitor, not the container
    f"/system.slice/docker-{ID[:12]}.scope",  # short ids are not what engines write
    f"/system.slice/docker-{ID.upper()}.scope",
    f"/system.slice/docker-{ID}.service",
    f"/system.slice/{ID}",  # an id under no engine's parent
    f"/pod{UID}/{ID}",  # a pod uid outside kubepods
    f"/docker/{ID}x",
    "/docker/" + "\udcff" * 64,  # bytes that are not UTF-8, kept as surrogate escapes
    "/" + "a/" * 5000,
])
def test_not_containers(path: str) -> None:
    assert container_of(path) is None


def test_a_container_above_a_pod_is_not_the_pods() -> None:
    assert container_of(f"/system.slice/docker-{ID}.scope/kubepods/pod{UID}") == \
        Container("kubernetes", None, UID)
