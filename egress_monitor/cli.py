"""The ``egress-monitor`` command line."""

from __future__ import annotations

import argparse
import faulthandler
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence

from egress_monitor import __version__, control
from egress_monitor.config import (
    DEFAULT_CONFIG,
    DEFAULTS,
    Config,
    load_config,
    parse_bit,
    parse_pair,
)
from egress_monitor.logfmt import LOG_FORMATS
from egress_monitor.policy.engine import Subject, decide, decide_name
from egress_monitor.policy.loader import MODES, PolicyError, load_policy
from egress_monitor.policy.schema import ROLES
from egress_monitor.report import FORMATS
from egress_monitor.sinks.events_log import DEFAULT_EVENTS_PATH

DESCRIPTION = """\
Watch the network egress of Rust builds. The daemon (run) follows every cargo invocation
and build script and everything they spawn, holds each new outbound connection of those
processes until it is attributed to a process, its lineage, its role and its crate, and
writes one JSON event per connection. Other processes on the host are never touched.
"""

EPILOG = """\
examples:
  egress-monitor run --events - --metrics-listen 127.0.0.1:9464
  egress-monitor exec -- cargo build --release
  egress-monitor policy check policies/default.yaml
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="egress-monitor", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground (root)",
                         description="Run the daemon in the foreground until SIGTERM or "
                         "SIGINT. Needs root. A clean stop removes every firewall rule and "
                         "cgroup it made; running builds carry on.")
    run.add_argument("--config", metavar="PATH",
                     help=f"daemon settings file (e.g. {DEFAULT_CONFIG}); the options here "
                     "override it")
    run.add_argument("--alertmanager", action="append", metavar="URL",
                     help="deliver alerts to this Alertmanager (repeatable; e.g. "
                     "http://alertmanager:9093)")
    run.add_argument("--upload-threshold", type=int, metavar="BYTES",
                     help="bytes one flow of a build may send off the host before an "
                     f"'upload' alert (default: {DEFAULTS.upload_threshold})")
    run.add_argument("--runner-name", metavar="NAME",
                     help="this runner's name on alerts (default: the host name)")
    run.add_argument("--iocs", metavar="PATH",
                     help="known-bad crates (default: /etc/egress-monitor/iocs.yaml, else "
                     "the bundled policies/iocs.yaml)")
    run.add_argument("--policy", metavar="PATH",
                     help="policy file (default: none: audit mode, nothing denied)")
    run.add_argument("--policy-dir", metavar="DIR",
                     help="drop-in policy files (*.yaml, applied by file name)")
    run.add_argument("--mode", choices=MODES, help="override the policy's mode")
    run.add_argument("--events", metavar="PATH",
                     help=f"JSON-lines event log, '-' for stdout (default: "
                     f"{DEFAULT_EVENTS_PATH})")
    run.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="serve Prometheus metrics here, once the kernel hooks are in place")
    run.add_argument("--runtime-dir", default=DEFAULTS.runtime_dir, metavar="DIR",
                     help=f"control socket and lock (default: {DEFAULTS.runtime_dir})")
    run.add_argument("--queue-base", type=int, default=DEFAULTS.queue_base, metavar="N",
                     help=f"first NFQUEUE number used for builds (default: "
                     f"{DEFAULTS.queue_base})")
    run.add_argument("--max-builds", type=int, default=DEFAULTS.max_builds, metavar="N",
                     help=f"concurrent builds, one queue number each (default: "
                     f"{DEFAULTS.max_builds})")
    run.add_argument("--sink-port", type=int, default=DEFAULTS.sink_port, metavar="PORT",
                     help="loopback port where refused TCP connections of builds are "
                     f"answered and recorded (default: {DEFAULTS.sink_port})")
    run.add_argument("--dns-port", type=int, metavar="PORT",
                     help="loopback port of the resolver builds' DNS is redirected to "
                     f"(default: the config's dns.port, else {DEFAULTS.dns_port})")
    run.add_argument("--no-dns", action="store_true",
                     help="no DNS guard: builds' DNS goes where they send it, unnamed")
    run.add_argument("--dns-upstream", action="append", metavar="ADDR[:PORT]",
                     help="resolver to forward builds' queries to; repeatable, tried in "
                     "order (default: the nameservers in /etc/resolv.conf)")
    run.add_argument("--dns-min-ttl", type=int, default=DEFAULTS.dns_min_ttl, metavar="S",
                     help="shortest time a name-to-address answer is kept (default: "
                     f"{DEFAULTS.dns_min_ttl})")
    run.add_argument("--dns-max-ttl", type=int, default=DEFAULTS.dns_max_ttl, metavar="S",
                     help="longest time a name-to-address answer is kept (default: "
                     f"{DEFAULTS.dns_max_ttl})")
    run.add_argument("--dns-ttl-overlap", type=int, default=DEFAULTS.dns_overlap, metavar="S",
                     help="how long past its TTL an answer still names an address "
                     f"(default: {DEFAULTS.dns_overlap})")
    run.add_argument("--proc-rcvbuf", type=int, default=DEFAULTS.proc_rcvbuf, metavar="BYTES",
                     help="receive buffer for fork/exec/exit events; when it overflows the "
                     "daemon resyncs from /proc (default: 16 MiB)")
    run.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                     help="log lines as text (default) or JSON objects (journald, log stores)")
    run.add_argument("--terminal", choices=("auto", "always", "never"), default="auto",
                     help="human lines on stderr per build start and end, alert and would-be "
                     "denial (default auto: when stderr is a terminal)")
    run.add_argument("--degraded", action="store_true",
                     help="run without identity from the kernel (BPF): builds found by names, "
                     "owners by /proc scans; every event says attribution: degraded. Without "
                     "it, a kernel that cannot load the programs stops the start")
    run.add_argument("--mark-tag", type=_mark_pair, metavar="TAG/MASK",
                     help="the socket-mark bits that say 'stamped by egress-monitor' "
                     f"(default {DEFAULTS.mark_tag:#x}/{DEFAULTS.mark_tag_mask:#x})")
    run.add_argument("--mark-tgid", type=_mark_pair, metavar="BITS/SHIFT",
                     help="where the creator's tgid sits in the mark (default "
                     f"{DEFAULTS.mark_tgid_bits}/{DEFAULTS.mark_tgid_shift}); checked "
                     "against pid_max and the host's mark rules at start")
    run.add_argument("--mark-fast", type=_mark_bit, metavar="BIT",
                     help="the mark bit of a TCP SYN the kernel sends ahead of the daemon's "
                     "judgment, for a process's repeat connection to a destination the "
                     f"daemon allowed it (default {DEFAULTS.mark_fast:#x}; 0: send none "
                     "ahead, judge every SYN in the daemon)")
    run.add_argument("--cargo", action="append", default=[], metavar="PATH",
                     help="a toolchain cargo binary besides rustup's and the distribution's "
                     "(repeatable): its exec starts a build")
    run.add_argument("--rustc", action="append", default=[], metavar="PATH",
                     help="a compiler or trusted RUSTC_WRAPPER besides the toolchains' "
                     "(repeatable): cargo running it is role rustc, not crate code")
    run.add_argument("--build-script-runner", action="append", default=[], metavar="PATH",
                     help="a build system's build-script runner (Bazel's "
                     "cargo_build_script_runner, a dedicated interpreter for Buck2's "
                     "buildscript_run.py; repeatable): its exec starts a build like cargo's, "
                     "and what it runs is a build script of the crate its CARGO_PKG_NAME "
                     "names")
    run.add_argument("--rustup-home", action="append", default=[], metavar="DIR",
                     help="a rustup home whose toolchains count (repeatable; $RUSTUP_HOME "
                     "and ~/.rustup always do)")
    run.add_argument("--engine-socket", action="append", default=[], metavar="PATH",
                     help="a container engine's API socket besides Docker's, Podman's, "
                     "containerd's and BuildKit's usual ones (repeatable; globs allowed): "
                     "a build connecting to it raises container_engine")
    run.add_argument("--engine-cgroup", action="append", default=[], metavar="REL",
                     help="a cgroup (relative to the cgroup2 mount) engines create "
                     "containers below, besides system.slice, machine.slice, docker, "
                     "libpod_parent and kubepods (repeatable): containers appearing there "
                     "while a build talks to an engine join the build")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    ex = sub.add_parser("exec", help="run a command as a build, watched from its first "
                        "instruction", description="Ask the running daemon to make this "
                        "process a build, then exec CMD in it: no instruction of CMD runs "
                        "unwatched. The exit status of CMD is passed through. Refuses to run "
                        "CMD if the daemon is not running.")
    ex.add_argument("--runtime-dir", default=control.DEFAULT_RUNTIME_DIR, metavar="DIR")
    ex.add_argument("--summary", metavar="FILE",
                    help="when CMD ends, append its build's report to FILE (e.g. "
                    "$GITHUB_STEP_SUMMARY)")
    ex.add_argument("--summary-format", choices=FORMATS, default="markdown")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    fc = sub.add_parser("failclosed", help="refuse builds' new connections at once while the "
                        "daemon is down (systemd ExecStopPost)",
                        description="After the daemon died, its rules still hold every build's "
                        "new flows in a queue nobody reads, and the kernel drops them (clients "
                        "wait for their own timeout). This replaces those rules by immediate "
                        "refusals. It does nothing after a clean stop (no rules are left) or "
                        "while a daemon runs. The next daemon start reinstalls its rules.")
    fc.add_argument("--dns-port", type=int, metavar="PORT",
                    help=f"the daemon's DNS port (default: the config's dns.port, else "
                    f"{DEFAULTS.dns_port})")
    fc.add_argument("--config", metavar="PATH", help="read fail_mode and dns.port from this "
                    "settings file: fail_mode 'closed' (default) refuses, 'open' removes the "
                    "rules; a file that cannot be read counts as 'closed' with the defaults")
    sc = sub.add_parser("scan", help="look for known-bad crates and files",
                        description="Check Cargo.lock files and crate sources (directory "
                        "sources, cargo vendor trees) below PATH (default: .) and the Cargo "
                        "registry cache and sources against the indicator list (and, with "
                        "--advisory-db, RustSec's malicious-crate advisories). Exit 0 when "
                        "nothing is found, 1 when something is, 2 on an error or when there "
                        "was nothing to examine.")
    sc.add_argument("paths", nargs="*", default=["."], metavar="PATH")
    sc.add_argument("--cargo-home", metavar="DIR",
                    help="Cargo home whose registry to scan (default: $CARGO_HOME or ~/.cargo)")
    sc.add_argument("--no-registry", action="store_true", help="Cargo.lock files only")
    sc.add_argument("--iocs", metavar="FILE", help="indicator list (default: "
                    "/etc/egress-monitor/iocs.yaml, else the bundled policies/iocs.yaml)")
    sc.add_argument("--advisory-db", metavar="DIR", help="a local RustSec advisory-db checkout")
    sc.add_argument("--json", action="store_true")
    sub.add_parser("cleanup", help="remove rules and build cgroups a dead daemon left",
                        description="For uninstalling, or after a crash with no restart "
                        "wanted: removes the firewall chains and hands every build cgroup's "
                        "processes back to the cgroup above it. Refuses while a daemon runs.")
    sub.add_parser("bpf-check", help="check that the kernel can run the identity programs",
                   description="Loads, attaches and removes the BPF programs the daemon uses "
                   "(docs/bpf.md) and says what is missing or in conflict. Exit 1 if any.")
    st = sub.add_parser("status", help="ask the running daemon for its state",
                        description="Mode, policy, builds in progress and the last alerts, "
                        "from the running daemon over its root-only control socket. Exit 3 "
                        "when it is not running.")
    st.add_argument("--runtime-dir", default=control.DEFAULT_RUNTIME_DIR, metavar="DIR")
    st.add_argument("--json", action="store_true", help="the daemon's answer as JSON")

    rep = sub.add_parser("report", help="per build: destinations, DNS names and alerts",
                         description="Read events (default: the daemon's events file) and "
                         "report per build where it connected by role and crate, with the "
                         "verdict and what enforce mode would do, the DNS names it asked and "
                         "its alerts. Exit 2 when no events can be read.")
    rep.add_argument("events", nargs="*", metavar="EVENTS",
                     help=f"JSON-lines event files (default: {DEFAULT_EVENTS_PATH})")
    rep.add_argument("--build", metavar="ID", help="only this build")
    rep.add_argument("--since", metavar="T", help="builds started since T: 2h, 7d or an "
                     "RFC 3339 time")
    rep.add_argument("--format", choices=FORMATS, default="text")

    pol = sub.add_parser("policy", help="policy tools")
    polsub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    chk = polsub.add_parser("check", help="validate policy files; errors as file:line:col",
                            description="Validate each policy file (with --dir, one policy: "
                            "the file and its drop-ins). Exit 0 when valid, 1 otherwise; "
                            "warnings (rules that can never decide) do not fail the check.")
    chk.add_argument("files", nargs="+", metavar="FILE")
    chk.add_argument("--dir", metavar="DIR", help="drop-in directory of the (single) file")
    sug = polsub.add_parser("suggest", help="a drop-in allowing what audited builds did",
                            description="From audit-mode events, write a drop-in that allows "
                            "what the builds did (groups and rules per role and crate, "
                            "hostnames where resolved, commented with how often and when). "
                            "What alerts flagged is listed apart, commented out, never allowed. "
                            "With --base, what that policy already allows is left out and the "
                            "result is checked together with it.")
    sug.add_argument("events", nargs="+", metavar="EVENTS")
    sug.add_argument("--base", metavar="POLICY", help="the main policy it is a drop-in for")
    sug.add_argument("--dir", metavar="DIR", help="the base's drop-in directory")
    sug.add_argument("--prefix", default="seen", help="start of group names and rule ids "
                     "(default: seen)")
    exp = polsub.add_parser("explain", help="which rule decides a connection, and why")
    exp.add_argument("--policy", required=True, metavar="FILE")
    exp.add_argument("--dir", metavar="DIR", help="drop-in directory")
    exp.add_argument("--role", required=True, choices=ROLES)
    exp.add_argument("--crate", metavar="NAME[@VERSION]")
    exp.add_argument("--exe", metavar="PATH", help="the process's executable")
    exp.add_argument("--ancestor", action="append", default=[], metavar="PATH",
                     help="an ancestor's executable (repeatable)")
    exp.add_argument("--root", metavar="PATH", help="the build's root executable")
    exp.add_argument("--dest", required=True, metavar="HOST_OR_IP[:PORT][/PROTO]")
    return p


def _run(args: argparse.Namespace) -> int:
    from egress_monitor.config import DaemonConfig, parse_listen
    from egress_monitor.daemon import Daemon, DaemonError
    from egress_monitor.dns.server import parse_upstream
    from egress_monitor.scan import default_iocs

    # `kill -USR1 PID` writes every thread's stack to stderr: for a daemon that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from egress_monitor.logfmt import formatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(args.log_format))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[handler])
    if os.geteuid() != 0:
        print("egress-monitor run: needs root (netfilter queues, cgroups, the proc "
              "connector)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config) if args.config else Config(source="<none>")
        metrics_listen = args.metrics_listen or cfg.metrics_listen
        listen = parse_listen(metrics_listen) if metrics_listen else None
        dns_port = args.dns_port or cfg.dns_port or DEFAULTS.dns_port
        upstreams = args.dns_upstream or list(cfg.dns_upstreams)
        tag = args.mark_tag or cfg.mark_tag or (DEFAULTS.mark_tag, DEFAULTS.mark_tag_mask)
        tgid = args.mark_tgid or cfg.mark_tgid or (DEFAULTS.mark_tgid_bits,
                                                   DEFAULTS.mark_tgid_shift)
        config = DaemonConfig(events_path=args.events or cfg.events or DEFAULTS.events_path,
                              policy_path=args.policy or cfg.policy,
                              policy_dir=args.policy_dir or cfg.policy_dir,
                              runner_name=args.runner_name or cfg.runner_name
                              or socket.gethostname(),
                              alertmanager_urls=tuple(args.alertmanager or
                                                      cfg.alertmanager_urls),
                              iocs_path=args.iocs or cfg.iocs or default_iocs(),
                              sink_port=args.sink_port,
                              upload_threshold=args.upload_threshold
                              or cfg.upload_threshold or DEFAULTS.upload_threshold,
                              mode=args.mode, metrics_listen=listen,
                              runtime_dir=args.runtime_dir, queue_base=args.queue_base,
                              max_builds=args.max_builds, proc_rcvbuf=args.proc_rcvbuf,
                              dns_port=None if args.no_dns else dns_port,
                              dns_upstreams=tuple(parse_upstream(u) for u in upstreams),
                              dns_min_ttl=args.dns_min_ttl, dns_max_ttl=args.dns_max_ttl,
                              dns_overlap=args.dns_ttl_overlap,
                              terminal=args.terminal == "always" or (
                                  args.terminal == "auto" and sys.stderr.isatty()),
                              degraded=args.degraded or bool(cfg.degraded),
                              mark_tag=tag[0], mark_tag_mask=tag[1], mark_tgid_bits=tgid[0],
                              mark_tgid_shift=tgid[1],
                              mark_fast=next(v for v in (args.mark_fast, cfg.mark_fast,
                                                         DEFAULTS.mark_fast) if v is not None),
                              cargo_paths=(*cfg.cargo_paths, *args.cargo),
                              rustc_paths=(*cfg.rustc_paths, *args.rustc),
                              rustup_homes=(*cfg.rustup_homes, *args.rustup_home),
                              build_script_runners=(*cfg.build_script_runners,
                                                    *args.build_script_runner),
                              engine_sockets=(*cfg.engine_sockets, *args.engine_socket),
                              engine_cgroups=(*cfg.engine_cgroups, *args.engine_cgroup))
        return Daemon(config).run()
    except PolicyError as exc:
        print(f"egress-monitor run: not started:\n{exc}", file=sys.stderr)
        return 2
    except (DaemonError, ValueError) as exc:
        print(f"egress-monitor run: {exc}", file=sys.stderr)
        return 2


def _mark_pair(text: str) -> tuple[int, int]:
    """``A/B`` with each a number (0x... for hex), for the mark options."""
    pair = parse_pair(text)
    if pair is None:
        raise argparse.ArgumentTypeError(f"expected A/B (numbers, 0x for hex), got {text!r}")
    return pair


def _mark_bit(text: str) -> int:
    """One mark bit or 0, for ``--mark-fast``."""
    bit = parse_bit(text)
    if bit is None:
        raise argparse.ArgumentTypeError(f"expected one bit (a power of two, 0x for hex) or "
                                         f"0, got {text!r}")
    return bit


def _exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("egress-monitor exec: nothing to run; usage: egress-monitor exec -- CMD ...",
              file=sys.stderr)
        return 2
    if shutil.which(cmd[0]) is None:
        print(f"egress-monitor exec: {cmd[0]}: command not found", file=sys.stderr)
        return 127
    if args.summary:
        from egress_monitor import execsummary

        return execsummary.run(cmd, args.runtime_dir, args.summary, args.summary_format)
    try:
        control.call({"op": "exec"}, args.runtime_dir)
    except control.ControlError as exc:
        print(f"egress-monitor exec: not running {cmd[0]} unwatched: {exc}", file=sys.stderr)
        return 125
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"egress-monitor exec: {cmd[0]}: {exc.strerror}", file=sys.stderr)
        return 126


def _failclosed(args: argparse.Namespace) -> int:
    import fcntl

    from egress_monitor.bpf.owner import detach_stale_at
    from egress_monitor.daemon import INSTANCE_LOCK
    from egress_monitor.enforce.cgroups import Cgroups, parse_build_cgroup
    from egress_monitor.enforce.firewall import Firewall, FirewallError
    from egress_monitor.enforce.rules import BuildRule, MarkGate

    os.makedirs(os.path.dirname(INSTANCE_LOCK), mode=0o700, exist_ok=True)
    with open(INSTANCE_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("egress-monitor failclosed: the daemon is running; nothing to do")
            return 0
        cfg, problem = Config(source="<none>"), None
        if args.config:
            try:
                cfg = load_config(args.config)
            except PolicyError as exc:  # the same YamlError: refuse with the defaults
                problem = exc
                print(f"egress-monitor failclosed: {args.config} cannot be used, refusing "
                      f"builds with the defaults (fail_mode closed):\n{exc}", file=sys.stderr)
        # The same DNS redirection as the daemon's rules (no sinkhole: nobody answers there
        # while the daemon is down, and refused means refused).
        # Stamped sockets of a dead daemon's members are refused as well (its cgroup
        # programs outlive it; the mark layout of the config file, else the default).
        firewall = Firewall(resolver_port=args.dns_port or cfg.dns_port or DEFAULTS.dns_port,
                            mark_gate=MarkGate(*(cfg.mark_tag or (DEFAULTS.mark_tag,
                                                                   DEFAULTS.mark_tag_mask)),
                                               DEFAULTS.mark_queue))
        fail_mode = cfg.fail_mode
        cgroups = Cgroups.discover()
        builds = []
        for rel in cgroups.build_cgroups():
            parsed = parse_build_cgroup(rel)
            if parsed is not None and cgroups.populated(rel):
                builds.append(BuildRule(rel, parsed[0]))
        present = firewall.present()
        if not builds and not present:
            print("egress-monitor failclosed: no build is running and no egress-monitor "
                  "rules are installed (clean stop); nothing to do")
            return 0
        if fail_mode == "open":
            errors = firewall.remove()
            detach_stale_at(cgroups.mount)  # its backstop would still drop members' packets
            print("egress-monitor failclosed: fail_mode is open: rules removed, builds run "
                  "unwatched until the daemon is back")
            return 1 if errors else 0
        try:
            # A running build is refused even when its rules are gone (a start that failed
            # half-way, a flush): install puts back the chains and jumps, refusing.
            if present:
                firewall.sync(builds, refuse=True)
            else:
                firewall.install(builds, refuse=True)
        except FirewallError as exc:
            print(f"egress-monitor failclosed: {exc}", file=sys.stderr)
            return 1
        print(f"egress-monitor failclosed: new connections of {len(builds)} build(s) are "
              "refused until the daemon is back")
        return 1 if problem else 0


def _scan(args: argparse.Namespace) -> int:
    from egress_monitor.iocs import Indicators, load_iocs, rustsec_malicious
    from egress_monitor.scan import default_iocs, scan

    path = args.iocs or default_iocs()
    try:
        ind = load_iocs(path) if path else Indicators()
        if args.advisory_db:
            ind = ind.merged(rustsec_malicious(args.advisory_db))
        cargo_home = None if args.no_registry else (
            args.cargo_home or os.environ.get("CARGO_HOME")
            or os.path.expanduser("~/.cargo"))
        result = scan(args.paths, cargo_home, ind)
    except (PolicyError, ValueError) as exc:
        print(f"egress-monitor scan: {exc}", file=sys.stderr)
        return 2
    findings = result.findings
    examined = {"lockfiles": result.lockfiles, "crates": result.crates, "files": result.files}
    if args.json:
        print(json.dumps({"findings": [f.as_dict() for f in findings], "examined": examined,
                          "indicators": {"crates": len(ind.crates), "files": len(ind.files)}},
                         indent=2))
    else:
        for f in findings:
            what = f"{f.name} {f.version}" if f.version else f.name
            print(f"{f.kind}: {what}: {f.why}\n    at {f.path}")
        if result.examined:
            print(f"{len(findings)} finding(s) in {result.crates} crate(s), "
                  f"{result.lockfiles} lock file(s) and {result.files} file(s) examined; "
                  f"{len(ind.crates)} crate and {len(ind.files)} file indicator(s) checked")
        else:
            print("nothing examined: no Cargo.lock, crate source or registry below "
                  + ", ".join(args.paths) + (f" or in {cargo_home}" if cargo_home else ""))
    if not result.examined:
        return 2
    return 1 if findings else 0


def _cleanup() -> int:
    import fcntl

    from egress_monitor.bpf.owner import detach_stale_at
    from egress_monitor.daemon import INSTANCE_LOCK
    from egress_monitor.enforce.cgroups import Cgroups
    from egress_monitor.enforce.firewall import Firewall
    from egress_monitor.enforce.netns import cookie_of, runner_in
    from egress_monitor.netns_record import clean_recorded

    os.makedirs(os.path.dirname(INSTANCE_LOCK), mode=0o700, exist_ok=True)
    with open(INSTANCE_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("egress-monitor cleanup: the daemon is running; stop it first (a clean stop "
                  "removes everything itself)", file=sys.stderr)
            return 1
        errors = Firewall().remove()
        cgroups = Cgroups.discover()
        released = cgroups.build_cgroups()
        for rel in released:
            cgroups.release(rel)
        # A daemon killed outright leaves its cgroup programs attached (closed: its members
        # stay refused in the kernel); cleanup hands everything back.
        programs = detach_stale_at(cgroups.mount)
        # Rules a stopped daemon left refusing inside gated namespaces, as it recorded them
        namespaces, ns_errors = clean_recorded(
            lambda fd: Firewall(runner=runner_in(fd)).remove(), cookie_of)
        print(f"egress-monitor cleanup: rules removed, {len(released)} build cgroup(s) "
              f"released, {programs} BPF program(s) detached, rules removed in "
              f"{namespaces} other network namespace(s)")
        return 1 if errors or ns_errors else 0


def _status(args: argparse.Namespace) -> int:
    try:
        answer = control.call({"op": "status"}, args.runtime_dir)
    except control.ControlError as exc:
        print(f"egress-monitor status: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    from egress_monitor.status import render

    print(render(answer))
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    if args.dir and len(args.files) != 1:
        print("egress-monitor policy check: --dir goes with exactly one FILE", file=sys.stderr)
        return 2
    failed = False
    for path in args.files:
        try:
            policy = load_policy(path, args.dir)
        except PolicyError as exc:
            failed = True
            for issue in exc.issues:
                print(issue, file=sys.stderr)
            continue
        for warning in policy.warnings:
            print(f"{warning} (warning)", file=sys.stderr)
        print(f"{path}: ok, mode {policy.mode}, {len(policy.rules)} rule(s), "
              f"digest {policy.digest[:12]}")
    return 1 if failed else 0


def parse_dest(text: str) -> tuple[str, int | None, str | None]:
    """``HOST_OR_IP[:PORT][/PROTO]``, IPv6 in brackets when a port follows."""
    text, _, proto = text.partition("/")
    port: int | None = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    else:
        host = text
    return host.lower().rstrip("."), port, proto or None


def _policy_explain(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy, args.dir)
        host, port, proto = parse_dest(args.dest)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ValueError:
        print(f"egress-monitor policy explain: --dest: expected HOST_OR_IP[:PORT][/PROTO], "
              f"got '{args.dest}'", file=sys.stderr)
        return 2
    name, _, version = (args.crate or "").partition("@")
    subject = Subject(role=args.role, crate=name or None, version=version or None,
                      exe=args.exe, ancestors=tuple(args.ancestor), root_exe=args.root)
    names: tuple[str, ...] = ()
    ip: str | None = host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        ip, names = None, (host,)
    # A port without a protocol is judged as TCP (what a connection to HOST:PORT almost
    # always is), and says so, with what the other protocols would get when it differs.
    judged = proto or ("tcp" if port is not None else None)
    decision = decide(policy, subject, ip=ip, port=port, protocol=judged, names=names)
    print(f"decision: {decision.action} (mode {policy.mode}: "
          f"{'enforced' if policy.mode == 'enforce' else 'recorded only'})")
    if proto is None and judged is not None:
        print(f"protocol: {judged} (none given)")
        for other in ("udp",):
            alt = decide(policy, subject, ip=ip, port=port, protocol=other, names=names)
            if (alt.action, alt.rule) != (decision.action, decision.rule):
                print(f"  over {other} it would be: {alt.action} ({alt.rule})")
    print(f"rule: {decision.rule}")
    print(f"why: {decision.why}")
    if names:
        dns = decide_name(policy, subject, host)
        print(f"dns: resolving {host} is "
              f"{'allowed' if dns.action in ('allow', 'alert') else 'refused'} "
              f"({dns.rule})")
    return 0


def _read_events(paths: list[str], what: str) -> list[dict[str, object]] | None:
    from egress_monitor.report import parse_lines

    records: list[dict[str, object]] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                got, bad = parse_lines(f)
        except OSError as exc:
            print(f"egress-monitor {what}: {path}: {exc.strerror}", file=sys.stderr)
            return None
        if bad:
            print(f"egress-monitor {what}: {path}: {bad} line(s) that are not events skipped",
                  file=sys.stderr)
        records += got
    return records


def _report(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from egress_monitor.report import build_reports, parse_since, render

    records = _read_events(args.events or [DEFAULT_EVENTS_PATH], "report")
    if records is None:
        return 2
    try:
        since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    except ValueError as exc:
        print(f"egress-monitor report: --since: {exc}", file=sys.stderr)
        return 2
    print(render(build_reports(records, build=args.build, since=since), args.format))
    return 0


def _policy_suggest(args: argparse.Namespace) -> int:
    from egress_monitor.policy.loader import load_policy, parse_files
    from egress_monitor.suggest import suggest

    records = _read_events(args.events, "policy suggest")
    if records is None:
        return 2
    try:
        base = load_policy(args.base, args.dir) if args.base else None
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    result = suggest(records, base, prefix=args.prefix)
    try:  # never hand out a drop-in that does not load (with its base, when given)
        files = [("<suggestion>", result.text)]
        if args.base:
            from egress_monitor.policy.loader import dropin_files

            for path in reversed([args.base, *(dropin_files(args.dir) if args.dir else [])]):
                with open(path, encoding="utf-8") as f:
                    files.insert(0, (path, f.read()))
        parse_files(files)
    except (PolicyError, OSError) as exc:
        print(f"egress-monitor policy suggest: internal error, the suggestion does not load:"
              f"\n{exc}", file=sys.stderr)
        return 1
    sys.stdout.write(result.text)
    print(f"egress-monitor policy suggest: {result.rules} rule(s), {result.groups} group(s), "
          f"{result.refused} flagged destination(s) left out", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "exec":
        return _exec(args)
    if args.command == "status":
        return _status(args)
    if args.command == "failclosed":
        return _failclosed(args)
    if args.command == "scan":
        return _scan(args)
    if args.command == "cleanup":
        return _cleanup()
    if args.command == "report":
        return _report(args)
    if args.command == "bpf-check":
        from egress_monitor.bpf import check
        code, lines = check.run()
        print("\n".join(lines), file=sys.stderr if code else sys.stdout)
        return code
    if args.policy_command == "suggest":
        return _policy_suggest(args)
    if args.policy_command == "explain":
        return _policy_explain(args)
    return _policy_check(args)


if __name__ == "__main__":
    sys.exit(main())
