"""The indicator list (known-bad crates and files), as bytes from disk."""

from egress_monitor.iocs import parse_iocs
from egress_monitor.yamlcheck import YamlError

ALLOWED: tuple[type[BaseException], ...] = (YamlError,)
STRUCTURE = "yaml"
DICTIONARY = (b"crates:\n", b"files:\n", b"- name: ", b"versions: ", b"why: ", b"sha256: ")


def target(data: bytes) -> None:
    parse_iocs(data, "iocs.yaml")
