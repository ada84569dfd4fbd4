"""Cgroup paths to containers (a build can create cgroups with any names)."""

from egress_monitor.containers import container_of

ALLOWED: tuple[type[BaseException], ...] = ()
DICTIONARY = (b"/", b"docker-", b"libpod-", b"cri-containerd-", b"crio-", b".scope",
              b"kubepods", b"kubepods-burstable-pod", b".slice", b"pod", b"_", b"-",
              b"libpod_parent", b"docker", b"0123456789abcdef" * 4, b"\xff")


def target(data: bytes) -> None:
    container_of(data.decode("utf-8", "surrogateescape"))
