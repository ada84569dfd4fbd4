"""A policy file (main file rules), as bytes from disk."""

from egress_monitor.policy.loader import PolicyError, parse_policy

ALLOWED: tuple[type[BaseException], ...] = (PolicyError,)
STRUCTURE = "yaml"
DICTIONARY = (b"version: 1\n", b"mode: enforce\n", b"rules:\n", b"groups:\n", b"id: ",
              b"action: ", b"to: ", b"hosts: ", b"cidrs: ", b"ports: ", b"protocols: ",
              b"role: ", b"crate: ", b"version: ", b"exe: ", b"ancestor: ", b"root: ",
              b"defaults: ", b"loopback: ", b"known_bad_crates: ", b"deny", b"allow")


def target(data: bytes) -> None:
    parse_policy(data, "policy.yaml")
