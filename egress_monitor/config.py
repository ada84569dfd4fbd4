"""The daemon's settings file, ``/etc/egress-monitor/config.yaml`` (separate from the policy).

Everything in it can also be given on the command line, which wins. Errors are reported like
policy errors: ``file:line:column``, the key, and what was expected; unknown keys are errors.
:func:`parse_config` and :func:`load_config` raise :class:`YamlError` and nothing else, for
any bytes (bounded: see :mod:`egress_monitor.yamlcheck`).

The daemon's defaults live here once, in :class:`DaemonConfig`: the command line's help
and the merge of command line, file and defaults (``cli``) read them from ``DEFAULTS``.

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
    kernel:                      # identity from the kernel (docs/bpf.md)
      degraded: false            # true: run without BPF (names and /proc scans)
      mark_tag: 0x80000000/0x80000000
      mark_tgid: 22/0            # BITS/SHIFT of the creator's tgid in the mark
      mark_fast: 0x40000000      # the bit of a SYN sent ahead (bpf/fast.py); 0: send none
      cargo: [/opt/rust/bin/cargo]
      rustc: [/usr/local/bin/sccache]
      rustup_homes: [/home/runner/.rustup]
      build_script_runners: [/srv/bazel/.../cargo_build_script_runner/runner]
    engine_sockets: [/srv/ci/docker.sock]   # besides the usual engines' (docs/bpf.md)
    engine_cgroups: [ci.slice]   # container cgroup parents besides the usual (docs/netns.md)
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

from egress_monitor.control import DEFAULT_RUNTIME_DIR
from egress_monitor.policy.schema import Mode
from egress_monitor.sinks.events_log import DEFAULT_EVENTS_PATH
from egress_monitor.yamlcheck import Issue, YamlError, YamlFile, compose, read, shown, small_int

_KEYS = ("version", "policy", "policy_dir", "events", "metrics_listen", "runner_name",
         "fail_mode", "iocs", "upload_threshold", "dns", "alertmanager", "kernel",
         "engine_sockets", "engine_cgroups")
_KERNEL_KEYS = ("degraded", "mark_tag", "mark_tgid", "mark_fast", "cargo", "rustc",
                "rustup_homes", "build_script_runners")
DEFAULT_CONFIG = "/etc/egress-monitor/config.yaml"


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything ``egress-monitor run`` can set, with the one set of defaults."""

    events_path: str = DEFAULT_EVENTS_PATH
    policy_path: str | None = None
    policy_dir: str | None = None  # drop-ins, *.yaml by file name
    mode: Mode | None = None  # overrides the policy's mode when given
    metrics_listen: tuple[str, int] | None = None
    runtime_dir: str = DEFAULT_RUNTIME_DIR
    queue_base: int = 31000
    max_builds: int = 512
    proc_root: str = "/proc"
    proc_rcvbuf: int = 16 << 20
    dns_port: int | None = 15353  # None: no DNS guard
    dns_upstreams: tuple[tuple[str, int], ...] = ()  # empty: the host's resolv.conf
    dns_min_ttl: int = 10
    dns_max_ttl: int = 3600
    dns_overlap: int = 10
    runner_name: str = ""
    iocs_path: str | None = None
    upload_threshold: int = 1 << 20  # bytes sent by one flow that make an upload alert
    sink_port: int = 15354  # refused TCP connections of builds are answered here
    alertmanager_urls: tuple[str, ...] = ()  # read and kept; delivery comes with alerting
    terminal: bool = False  # human lines on stderr (run on a TTY)
    # Identity from the kernel (docs/bpf.md). degraded: run without it (userspace
    # attribution by names and /proc; every event says `attribution: degraded`).
    degraded: bool = False
    mark_tag: int = 0x80000000  # the stamp's tag under mark_tag_mask; tgid below it
    mark_tag_mask: int = 0x80000000
    mark_tgid_bits: int = 22
    mark_tgid_shift: int = 0
    mark_fast: int = 0x40000000  # a SYN sent ahead (bpf/fast.py); 0: none
    cargo_paths: tuple[str, ...] = ()  # toolchain cargo binaries besides those found
    rustc_paths: tuple[str, ...] = ()  # compilers / trusted RUSTC_WRAPPERs besides those found
    rustup_homes: tuple[str, ...] = ()  # besides $RUSTUP_HOME and ~/.rustup
    # Bazel's/Buck2's build-script runners: they start a build, what they run is a build
    # script of the crate their environment names (docs/bpf.md "Build-script runners")
    build_script_runners: tuple[str, ...] = ()
    engine_sockets: tuple[str, ...] = ()  # container engine sockets besides the usual ones
    engine_cgroups: tuple[str, ...] = ()  # container cgroup parents besides the usual ones

    @property
    def mark_queue(self) -> int:
        """The queue of stamped packets no build cgroup rule took (just above builds')."""
        return self.queue_base + self.max_builds


DEFAULTS = DaemonConfig()


class ListenError(ValueError):
    """A listen address that is not ``HOST:PORT``."""


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces) to a (host, port) pair;
    raises ListenError, only, for anything else."""
    host, sep, port_text = value.rpartition(":")
    port = small_int(port_text)
    if not sep or port is None or not 0 < port < 65536:
        raise ListenError(f"expected HOST:PORT, got {shown(value)!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, port


def _upstream_ok(value: str) -> bool:
    """``ADDR``, ``ADDR:PORT``, ``[V6]:PORT`` or a bare IPv6 address (as the DNS server
    reads them), with a valid address and port."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port: int | None = small_int(rest[1:]) if rest.startswith(":") else 53 if not rest \
            else None
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        port = small_int(port_text)
    else:
        host, port = value, 53
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return port is not None and 0 < port < 65536


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
    degraded: bool | None = None
    mark_tag: tuple[int, int] | None = None
    mark_tgid: tuple[int, int] | None = None
    mark_fast: int | None = None
    cargo_paths: tuple[str, ...] = ()
    rustc_paths: tuple[str, ...] = ()
    rustup_homes: tuple[str, ...] = ()
    build_script_runners: tuple[str, ...] = ()
    engine_sockets: tuple[str, ...] = ()
    engine_cgroups: tuple[str, ...] = ()


def parse_pair(text: str) -> tuple[int, int] | None:
    """``A/B``, each a number (``0x`` for hex), or None."""
    first, sep, second = text.partition("/")
    try:
        return (int(first, 0), int(second, 0)) if sep else None
    except ValueError:
        return None


def parse_config(text: str | bytes, path: str) -> Config:
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
                f"'{shown(fields['version'][1])}'")
    for key in ("policy", "policy_dir", "events", "runner_name", "iocs"):
        if key in fields:
            values[key] = f.string(fields[key][1], key)
    if "metrics_listen" in fields:
        node = fields["metrics_listen"][1]
        text_value = f.string(node, "metrics_listen")
        if text_value is not None:
            try:
                parse_listen(text_value)
            except ListenError:
                f.error(node, f"key 'metrics_listen': expected HOST:PORT, got "
                        f"'{shown(text_value)}'")
        values["metrics_listen"] = text_value
    if "upload_threshold" in fields:
        values["upload_threshold"] = f.integer(fields["upload_threshold"][1],
                                               "upload_threshold", 1, 1 << 62,
                                               "a number of bytes")
    if "fail_mode" in fields:
        values["fail_mode"] = f.choice(fields["fail_mode"][1], "fail_mode", ("closed", "open"))
    if "dns" in fields:
        dns = f.mapping(fields["dns"][1], "dns", ("upstreams", "port"))
        if "upstreams" in dns:
            upstreams = []
            for item, value in f.strings(dns["upstreams"][1], "dns.upstreams"):
                if not _upstream_ok(value):
                    f.error(item, "key 'dns.upstreams': expected ADDR, ADDR:PORT or "
                            f"[V6]:PORT, got '{shown(value)}'")
                upstreams.append(value)
            values["dns_upstreams"] = tuple(upstreams)
        if "port" in dns:
            values["dns_port"] = f.integer(dns["port"][1], "dns.port", 1, 65535,
                                           "a port 1-65535")
    if "alertmanager" in fields:
        am = f.mapping(fields["alertmanager"][1], "alertmanager", ("urls",))
        if "urls" in am:
            urls = []
            for item, url in f.strings(am["urls"][1], "alertmanager.urls"):
                try:
                    parsed = urllib.parse.urlsplit(url)
                    ok = parsed.scheme in ("http", "https") and bool(parsed.netloc)
                    _ = parsed.port  # raises on a port that is not a number in range
                except ValueError:
                    ok = False
                if not ok:
                    f.error(item, f"key 'alertmanager.urls': expected an http(s) URL, got "
                            f"'{shown(url)}'")
                urls.append(url)
            values["alertmanager_urls"] = tuple(urls)
    if "engine_sockets" in fields:
        values["engine_sockets"] = tuple(v for _n, v in f.strings(fields["engine_sockets"][1],
                                                                  "engine_sockets"))
    if "engine_cgroups" in fields:
        values["engine_cgroups"] = tuple(v for _n, v in f.strings(fields["engine_cgroups"][1],
                                                                  "engine_cgroups"))
    if "kernel" in fields:
        kernel = f.mapping(fields["kernel"][1], "kernel", _KERNEL_KEYS)
        if "degraded" in kernel:
            flag = f.choice(kernel["degraded"][1], "kernel.degraded", ("true", "false"))
            values["degraded"] = None if flag is None else flag == "true"
        for key in ("mark_tag", "mark_tgid"):
            if key in kernel:
                node = kernel[key][1]
                pair_text = f.string(node, f"kernel.{key}")
                pair = parse_pair(pair_text) if pair_text is not None else None
                if pair_text is not None and pair is None:
                    f.error(node, f"key 'kernel.{key}': expected A/B (numbers, 0x for hex), "
                            f"got '{shown(pair_text)}'")
                values[key] = pair
        if "mark_fast" in kernel:
            node = kernel["mark_fast"][1]
            raw = getattr(node, "value", None)  # a scalar's text: 0x... is not a YAML int
            bit = parse_bit(raw) if isinstance(raw, str) else None
            if bit is None:
                f.error(node, "key 'kernel.mark_fast': expected one bit (a power of two, 0x "
                        f"for hex) or 0, got '{shown(node)}'")
            values["mark_fast"] = bit
        for key, name in (("cargo", "cargo_paths"), ("rustc", "rustc_paths"),
                          ("rustup_homes", "rustup_homes"),
                          ("build_script_runners", "build_script_runners")):
            if key in kernel:
                values[name] = tuple(v for _n, v in f.strings(kernel[key][1], f"kernel.{key}"))
    if issues:
        raise YamlError(issues)
    return Config(source=path, **{k: v for k, v in values.items() if v is not None})  # type: ignore[arg-type]


def parse_bit(text: str) -> int | None:
    """One mark bit (``0x40000000``, ``1073741824``) or 0; None if it is neither. Total."""
    try:
        value = int(text.strip(), 0)
    except ValueError:
        return None
    return value if 0 <= value <= 0xFFFFFFFF and not value & (value - 1) else None


def load_config(path: str) -> Config:
    """Read and validate a config file; raises YamlError, only."""
    return parse_config(read(path), path)
