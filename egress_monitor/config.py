"""The daemon's settings file, ``/etc/egress-monitor/config.yaml`` (separate from the policy).

Everything in it can also be given on the command line, which wins. Errors are reported like
policy errors: ``file:line:column``, the key, and what was expected; unknown keys are errors.

    version: 1
    policy: /etc/egress-monitor/policy.yaml
    policy_dir: /etc/egress-monitor/policy.d
    events: /var/log/egress-monitor/events.jsonl
    metrics_listen: 127.0.0.1:9464
    runner_name: ci-runner-17
    fail_mode: closed            # closed | open: what `failclosed` does while the daemon is down
    dns:
      upstreams: [10.0.0.2, "10.0.0.3:53"]
      port: 15353
    alertmanager:
      urls: [http://alertmanager.internal:9093]
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

import yaml

from egress_monitor.yamlcheck import Issue, YamlError, YamlFile, compose

_KEYS = ("version", "policy", "policy_dir", "events", "metrics_listen", "runner_name",
         "fail_mode", "iocs", "upload_threshold", "dns", "alertmanager")
DEFAULT_CONFIG = "/etc/egress-monitor/config.yaml"


@dataclass(frozen=True, slots=True)
class Config:
    """Settings read from the file; None means "not set here"."""

    source: str
    policy: str | None = None
    policy_dir: str | None = None
    events: str | None = None
    metrics_listen: str | None = None
    runner_name: str | None = None
    iocs: str | None = None
    upload_threshold: int | None = None
    fail_mode: Literal["closed", "open"] = "closed"
    dns_upstreams: tuple[str, ...] = ()
    dns_port: int | None = None
    alertmanager_urls: tuple[str, ...] = field(default_factory=tuple)


def parse_config(text: str, path: str) -> Config:
    """Validate config text; raises YamlError naming every problem."""
    issues: list[Issue] = []
    f = YamlFile(path, issues)
    root = compose(text, path)
    if root is None:
        return Config(source=path)
    fields = f.mapping(root, "", _KEYS)
    values: dict[str, object] = {}
    if "version" in fields and fields["version"][1].value != "1":
        f.error(fields["version"][1], f"key 'version': expected 1, got "
                f"'{fields['version'][1].value}'")
    for key in ("policy", "policy_dir", "events", "runner_name", "iocs"):
        if key in fields:
            values[key] = f.string(fields[key][1], key)
    if "metrics_listen" in fields:
        node = fields["metrics_listen"][1]
        text_value = f.string(node, "metrics_listen")
        _host, sep, port = (text_value or "").rpartition(":")
        if text_value is not None and (not sep or not port.isdigit()
                                       or not 0 < int(port) < 65536):
            f.error(node, f"key 'metrics_listen': expected HOST:PORT, got '{text_value}'")
        values["metrics_listen"] = text_value
    if "upload_threshold" in fields:
        node = fields["upload_threshold"][1]
        if isinstance(node, yaml.ScalarNode) and node.value.isdigit() and int(node.value) > 0:
            values["upload_threshold"] = int(node.value)
        else:
            f.error(node, f"key 'upload_threshold': expected a number of bytes, got "
                    f"'{getattr(node, 'value', node)}'")
    if "fail_mode" in fields:
        values["fail_mode"] = f.choice(fields["fail_mode"][1], "fail_mode", ("closed", "open"))
    if "dns" in fields:
        dns = f.mapping(fields["dns"][1], "dns", ("upstreams", "port"))
        if "upstreams" in dns:
            values["dns_upstreams"] = tuple(v for _, v in f.strings(dns["upstreams"][1],
                                                                    "dns.upstreams"))
        if "port" in dns:
            node = dns["port"][1]
            if not (isinstance(node, yaml.ScalarNode) and node.value.isdigit()
                    and 0 < int(node.value) < 65536):
                f.error(node, f"key 'dns.port': expected a port 1-65535, got "
                        f"'{getattr(node, 'value', node)}'")
            else:
                values["dns_port"] = int(node.value)
    if "alertmanager" in fields:
        am = f.mapping(fields["alertmanager"][1], "alertmanager", ("urls",))
        if "urls" in am:
            urls = []
            for item, url in f.strings(am["urls"][1], "alertmanager.urls"):
                parsed = urllib.parse.urlparse(url)
                if parsed.scheme not in ("http", "https") or not parsed.netloc:
                    f.error(item, f"key 'alertmanager.urls': expected an http(s) URL, got "
                            f"'{url}'")
                urls.append(url)
            values["alertmanager_urls"] = tuple(urls)
    if issues:
        raise YamlError(issues)
    return Config(source=path, **{k: v for k, v in values.items() if v is not None})  # type: ignore[arg-type]


def load_config(path: str) -> Config:
    """Read and validate a config file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise YamlError([Issue(path, 1, 1, f"cannot read: {exc.strerror}")]) from exc
    return parse_config(text, path)
