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
from egress_monitor.config import DEFAULT_CONFIG, Config, load_config
from egress_monitor.policy.engine import Subject, decide, decide_name
from egress_monitor.policy.loader import MODES, PolicyError, load_policy
from egress_monitor.policy.schema import ROLES
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
                     "'upload' alert (default: 1048576)")
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
    run.add_argument("--runtime-dir", default=control.DEFAULT_RUNTIME_DIR, metavar="DIR",
                     help=f"control socket and lock (default: {control.DEFAULT_RUNTIME_DIR})")
    run.add_argument("--queue-base", type=int, default=31000, metavar="N",
                     help="first NFQUEUE number used for builds (default: 31000)")
    run.add_argument("--max-builds", type=int, default=512, metavar="N",
                     help="concurrent builds, one queue number each (default: 512)")
    run.add_argument("--sink-port", type=int, default=15354, metavar="PORT",
                     help="loopback port where refused TCP connections of builds are "
                     "answered and recorded (default: 15354)")
    run.add_argument("--dns-port", type=int, metavar="PORT",
                     help="loopback port of the resolver builds' DNS is redirected to "
                     "(default: 15353)")
    run.add_argument("--no-dns", action="store_true",
                     help="no DNS guard: builds' DNS goes where they send it, unnamed")
    run.add_argument("--dns-upstream", action="append", metavar="ADDR[:PORT]",
                     help="resolver to forward builds' queries to; repeatable, tried in "
                     "order (default: the nameservers in /etc/resolv.conf)")
    run.add_argument("--dns-min-ttl", type=int, default=10, metavar="S",
                     help="shortest time a name-to-address answer is kept (default: 10)")
    run.add_argument("--dns-max-ttl", type=int, default=3600, metavar="S",
                     help="longest time a name-to-address answer is kept (default: 3600)")
    run.add_argument("--dns-ttl-overlap", type=int, default=10, metavar="S",
                     help="how long past its TTL an answer still names an address "
                     "(default: 10)")
    run.add_argument("--proc-rcvbuf", type=int, default=16 << 20, metavar="BYTES",
                     help="receive buffer for fork/exec/exit events; when it overflows the "
                     "daemon resyncs from /proc (default: 16 MiB)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    ex = sub.add_parser("exec", help="run a command as a build, watched from its first "
                        "instruction", description="Ask the running daemon to make this "
                        "process a build, then exec CMD in it: no instruction of CMD runs "
                        "unwatched. The exit status of CMD is passed through. Refuses to run "
                        "CMD if the daemon is not running.")
    ex.add_argument("--runtime-dir", default=control.DEFAULT_RUNTIME_DIR, metavar="DIR")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    fc = sub.add_parser("failclosed", help="refuse builds' new connections at once while the "
                        "daemon is down (systemd ExecStopPost)",
                        description="After the daemon died, its rules still hold every build's "
                        "new flows in a queue nobody reads, and the kernel drops them (clients "
                        "wait for their own timeout). This replaces those rules by immediate "
                        "refusals. It does nothing after a clean stop (no rules are left) or "
                        "while a daemon runs. The next daemon start reinstalls its rules.")
    fc.add_argument("--dns-port", type=int, default=15353, metavar="PORT")
    fc.add_argument("--config", metavar="PATH", help="read fail_mode from this settings "
                    "file: 'closed' (default) refuses, 'open' removes the rules")
    sc = sub.add_parser("scan", help="look for known-bad crates and files",
                        description="Check Cargo.lock files below PATH (default: .) and the "
                        "Cargo registry cache against the indicator list (and, with "
                        "--advisory-db, RustSec's malicious-crate advisories). Exit 0 when "
                        "nothing is found, 1 when something is, 2 on an error.")
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

    pol = sub.add_parser("policy", help="policy tools")
    polsub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    chk = polsub.add_parser("check", help="validate policy files; errors as file:line:col",
                            description="Validate each policy file (with --dir, one policy: "
                            "the file and its drop-ins). Exit 0 when valid, 1 otherwise; "
                            "warnings (rules that can never decide) do not fail the check.")
    chk.add_argument("files", nargs="+", metavar="FILE")
    chk.add_argument("--dir", metavar="DIR", help="drop-in directory of the (single) file")
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
    from egress_monitor.daemon import Daemon, DaemonConfig, DaemonError, parse_listen
    from egress_monitor.dns.server import parse_upstream
    from egress_monitor.scan import default_iocs

    # `kill -USR1 PID` writes every thread's stack to stderr: for a daemon that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if os.geteuid() != 0:
        print("egress-monitor run: needs root (netfilter queues, cgroups, the proc "
              "connector)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config) if args.config else Config(source="<none>")
        metrics_listen = args.metrics_listen or cfg.metrics_listen
        listen = parse_listen(metrics_listen) if metrics_listen else None
        dns_port = args.dns_port or cfg.dns_port or 15353
        upstreams = args.dns_upstream or list(cfg.dns_upstreams)
        config = DaemonConfig(events_path=args.events or cfg.events or DEFAULT_EVENTS_PATH,
                              policy_path=args.policy or cfg.policy,
                              policy_dir=args.policy_dir or cfg.policy_dir,
                              runner_name=args.runner_name or cfg.runner_name
                              or socket.gethostname(),
                              alertmanager_urls=tuple(args.alertmanager or
                                                      cfg.alertmanager_urls),
                              iocs_path=args.iocs or cfg.iocs or default_iocs(),
                              sink_port=args.sink_port,
                              upload_threshold=args.upload_threshold
                              or cfg.upload_threshold or 1 << 20,
                              mode=args.mode, metrics_listen=listen,
                              runtime_dir=args.runtime_dir, queue_base=args.queue_base,
                              max_builds=args.max_builds, proc_rcvbuf=args.proc_rcvbuf,
                              dns_port=None if args.no_dns else dns_port,
                              dns_upstreams=tuple(parse_upstream(u) for u in upstreams),
                              dns_min_ttl=args.dns_min_ttl, dns_max_ttl=args.dns_max_ttl,
                              dns_overlap=args.dns_ttl_overlap)
        return Daemon(config).run()
    except PolicyError as exc:
        print(f"egress-monitor run: not started:\n{exc}", file=sys.stderr)
        return 2
    except (DaemonError, ValueError) as exc:
        print(f"egress-monitor run: {exc}", file=sys.stderr)
        return 2


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

    from egress_monitor.daemon import INSTANCE_LOCK
    from egress_monitor.enforce.cgroups import Cgroups, parse_build_cgroup
    from egress_monitor.enforce.firewall import Firewall, FirewallError
    from egress_monitor.enforce.rules import BuildRule

    os.makedirs(os.path.dirname(INSTANCE_LOCK), mode=0o700, exist_ok=True)
    with open(INSTANCE_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("egress-monitor failclosed: the daemon is running; nothing to do")
            return 0
        firewall = Firewall(resolver_port=args.dns_port)
        fail_mode = load_config(args.config).fail_mode if args.config else "closed"
        if not firewall.present():
            print("egress-monitor failclosed: no egress-monitor rules are installed "
                  "(clean stop); nothing to do")
            return 0
        if fail_mode == "open":
            errors = firewall.remove()
            print("egress-monitor failclosed: fail_mode is open: rules removed, builds run "
                  "unwatched until the daemon is back")
            return 1 if errors else 0
        cgroups = Cgroups.discover()
        builds = []
        for rel in cgroups.build_cgroups():
            parsed = parse_build_cgroup(rel)
            if parsed is not None:
                builds.append(BuildRule(rel, parsed[0]))
        try:
            firewall.sync(builds, refuse=True)
        except FirewallError as exc:
            print(f"egress-monitor failclosed: {exc}", file=sys.stderr)
            return 1
        print(f"egress-monitor failclosed: new connections of {len(builds)} build(s) are "
              "refused until the daemon is back")
        return 0


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
        findings = scan(args.paths, cargo_home, ind)
    except (PolicyError, ValueError) as exc:
        print(f"egress-monitor scan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"findings": [f.as_dict() for f in findings],
                          "indicators": {"crates": len(ind.crates), "files": len(ind.files)}},
                         indent=2))
    else:
        for f in findings:
            what = f"{f.name} {f.version}" if f.version else f.name
            print(f"{f.kind}: {what}: {f.why}\n    at {f.path}")
        print(f"{len(findings)} finding(s); {len(ind.crates)} crate and {len(ind.files)} file "
              f"indicator(s) checked")
    return 1 if findings else 0


def _cleanup() -> int:
    import fcntl

    from egress_monitor.daemon import INSTANCE_LOCK
    from egress_monitor.enforce.cgroups import Cgroups
    from egress_monitor.enforce.firewall import Firewall

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
        print(f"egress-monitor cleanup: rules removed, {len(released)} build cgroup(s) "
              "released")
        return 1 if errors else 0


def _status(args: argparse.Namespace) -> int:
    try:
        answer = control.call({"op": "status"}, args.runtime_dir)
    except control.ControlError as exc:
        print(f"egress-monitor status: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"egress-monitor: running (pid {answer['pid']}, up {answer['uptime_s']:.0f}s), "
          f"mode {answer['mode']}, runner {answer['runner']}")
    pol = answer["policy"]
    print(f"policy: {pol['source']} (digest {pol['digest'][:12]}, {pol['rules']} rule(s))")
    print(f"builds active: {len(answer['builds'])}")
    for b in answer["builds"]:
        c = b["connections"]
        print(f"  {b['id']}  {os.path.basename(b['root_exe'] or '?')}  {b['cwd'] or '?'}  "
              f"age {b['age_s']:.0f}s  {b['processes']} process(es)  connections "
              f"{c.get('allow', 0)} allowed, {c.get('deny', 0)} denied")
    print(f"last alerts: {len(answer['last_alerts'])}")
    for a in answer["last_alerts"]:
        crate = a["crate"]["name"] if a.get("crate") else "-"
        dst = a.get("dst") or {}
        where = f"{dst.get('ip')}:{dst.get('port')}" if dst else ""
        print(f"  {a['ts']}  {a.get('kind') or a['type']}  {a.get('role') or '-'}  {crate}  "
              f"{where}  {a.get('rule') or ''}".rstrip())
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
    decision = decide(policy, subject, ip=ip, port=port, protocol=proto, names=names)
    print(f"decision: {decision.action} (mode {policy.mode}: "
          f"{'enforced' if policy.mode == 'enforce' else 'recorded only'})")
    print(f"rule: {decision.rule}")
    print(f"why: {decision.why}")
    if names:
        dns = decide_name(policy, subject, host)
        print(f"dns: resolving {host} is "
              f"{'allowed' if dns.action in ('allow', 'alert') else 'refused'} "
              f"({dns.rule})")
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
    if args.command == "bpf-check":
        from egress_monitor.bpf import check
        code, lines = check.run()
        print("\n".join(lines), file=sys.stderr if code else sys.stdout)
        return code
    if args.policy_command == "explain":
        return _policy_explain(args)
    return _policy_check(args)


if __name__ == "__main__":
    sys.exit(main())
