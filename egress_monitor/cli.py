"""The ``egress-monitor`` command line."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence

from egress_monitor import __version__, control
from egress_monitor.policy.loader import MODES, PolicyError, load_policy
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
    run.add_argument("--policy", metavar="PATH", help="policy file (default: none, audit)")
    run.add_argument("--mode", choices=MODES,
                     help="override the policy's mode (only 'audit' is enforced as yet)")
    run.add_argument("--events", metavar="PATH", default=DEFAULT_EVENTS_PATH,
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
    run.add_argument("--dns-port", type=int, default=15353, metavar="PORT",
                     help="loopback port of the resolver builds' DNS is redirected to "
                     "(default: 15353)")
    run.add_argument("--no-dns", action="store_true",
                     help="no DNS guard: builds' DNS goes where they send it, unnamed")
    run.add_argument("--dns-upstream", action="append", default=[], metavar="ADDR[:PORT]",
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

    st = sub.add_parser("status", help="ask the running daemon for its state")
    st.add_argument("--runtime-dir", default=control.DEFAULT_RUNTIME_DIR, metavar="DIR")

    pol = sub.add_parser("policy", help="policy tools")
    polsub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    chk = polsub.add_parser("check", help="validate policy files; errors as file:line:col")
    chk.add_argument("files", nargs="+", metavar="FILE")
    return p


def _run(args: argparse.Namespace) -> int:
    from egress_monitor.daemon import Daemon, DaemonConfig, DaemonError, parse_listen
    from egress_monitor.dns.server import parse_upstream

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
        listen = parse_listen(args.metrics_listen) if args.metrics_listen else None
        config = DaemonConfig(events_path=args.events, policy_path=args.policy,
                              mode=args.mode, metrics_listen=listen,
                              runtime_dir=args.runtime_dir, queue_base=args.queue_base,
                              max_builds=args.max_builds, proc_rcvbuf=args.proc_rcvbuf,
                              dns_port=None if args.no_dns else args.dns_port,
                              dns_upstreams=tuple(parse_upstream(u) for u in args.dns_upstream),
                              dns_min_ttl=args.dns_min_ttl, dns_max_ttl=args.dns_max_ttl,
                              dns_overlap=args.dns_ttl_overlap)
        return Daemon(config).run()
    except PolicyError as exc:
        print(f"egress-monitor run: policy not loaded:\n{exc}", file=sys.stderr)
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


def _status(args: argparse.Namespace) -> int:
    try:
        answer = control.call({"op": "status"}, args.runtime_dir)
    except control.ControlError as exc:
        print(f"egress-monitor status: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(answer, indent=2))
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            load_policy(path)
        except PolicyError as exc:
            failed = True
            for issue in exc.issues:
                print(issue, file=sys.stderr)
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "exec":
        return _exec(args)
    if args.command == "status":
        return _status(args)
    return _policy_check(args)


if __name__ == "__main__":
    sys.exit(main())
