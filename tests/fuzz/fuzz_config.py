"""The daemon's config file, as bytes from disk."""

from egress_monitor.config import parse_config
from egress_monitor.yamlcheck import YamlError

ALLOWED: tuple[type[BaseException], ...] = (YamlError,)
STRUCTURE = "yaml"
DICTIONARY = (b"version: 1\n", b"policy: ", b"metrics_listen: ", b"dns:\n", b"port: ",
              b"upstreams: ", b"alertmanager:\n", b"urls: ", b"upload_threshold: ",
              b"fail_mode: ", b"http://[", b"http://a:99999", b"kernel:\n", b"mark_fast: ",
              b"mark_tag: ", b"mark_tgid: ", b"0x40000000", b"0x3", b"engine_cgroups: ")


def target(data: bytes) -> None:
    parse_config(data, "config.yaml")
