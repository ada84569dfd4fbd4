"""Secret values by fingerprint: which variables, which encodings, and nothing written."""

from __future__ import annotations

import base64
import random
from urllib.parse import quote

import pytest

from egress_monitor.detect.secrets import SecretMatcher, SecretRules, scrub_record, select

VALUE = b"wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEfake"
TOKEN = b"ghp_0fake1token2value3never4real5ab"
ENVIRON = b"\0".join([
    b"AWS_SECRET_ACCESS_KEY=" + VALUE, b"GITHUB_TOKEN=" + TOKEN, b"HOME=/root",
    b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", b"EM_ACTIONS=get,post",
    b"RANDOM_BLOB=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MEFCQ0RFRg", b"MY_PASSWORD=short",
    b"DB_PASSWORD=correcthorse", b"CARGO_PKG_NAME=evil-dep", b"noequals", b"=x", b""])


def matcher() -> SecretMatcher:
    m = SecretMatcher()
    m.add(select(ENVIRON))
    return m


def test_select_takes_named_secrets_and_generated_values_only() -> None:
    assert sorted(select(ENVIRON)) == ["AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "GITHUB_TOKEN",
                                       "RANDOM_BLOB"]
    rules = SecretRules(names=frozenset({"EM_ACTIONS"}), ignore=frozenset({"RANDOM_BLOB"}))
    assert sorted(select(ENVIRON, rules)) == ["AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
                                              "EM_ACTIONS", "GITHUB_TOKEN"]


def test_what_rustup_and_cargo_set_is_not_a_secret() -> None:
    env = (b"RUSTUP_TOOLCHAIN=stable-x86_64-unknown-linux-gnu\0"
           b"TARGET=x86_64-unknown-linux-gnu\0RUSTC=/root/.rustup/toolchains/x/bin/rustc\0")
    assert select(env) == {}


def wrapped(prefix: bytes, value: bytes) -> list[tuple[str, bytes]]:
    b64 = base64.b64encode(prefix + value + b"&more")
    return [
        ("raw", b"GET /p1?t=" + prefix + value + b" HTTP/1.1\r\n\r\n"),
        ("url", b"GET /p1?t=" + quote(prefix + value, safe="").encode() + b" HTTP/1.1\r\n"),
        ("pct-everything", b"x=" + "".join(f"%{c:02X}" for c in value).encode()),
        ("base64", b"GET /p3?d=" + b64 + b" HTTP/1.1\r\n"),
        ("base64url", b"?d=" + base64.urlsafe_b64encode(prefix + value)),
        ("base64 url-encoded", b"?d=" + quote(b64, safe="").encode()),
        ("hex", b"POST / HTTP/1.1\r\n\r\n" + (prefix + value).hex().upper().encode()),
        ("base32 dns", base64.b32encode(prefix + value).lower().rstrip(b"=") + b".x.example"),
        ("lower-cased", b"Host: " + (prefix + value).lower() + b".evil.example\r\n"),
    ]


@pytest.mark.parametrize("prefix", [b"", b"a", b"ab", b"abc", b"abcd"])
def test_each_encoding_at_each_alignment_names_the_variable(prefix: bytes) -> None:
    m = matcher()
    for what, data in wrapped(prefix, VALUE):
        hit = m.find(data)
        assert hit is not None and hit.names == ("AWS_SECRET_ACCESS_KEY",), what


def test_a_hit_says_how_the_value_was_encoded_and_names_every_variable() -> None:
    hit = matcher().find(b"a=" + base64.b64encode(VALUE) + b"&b=" + TOKEN.hex().encode())
    assert hit is not None and hit.names == ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN")
    assert hit.encodings == ("base64", "hex")


def test_data_without_the_values_is_not_a_hit() -> None:
    m = matcher()
    rng = random.Random(7)
    assert m.find(b"POST /x HTTP/1.1\r\n\r\nAWS_SECRET_ACCESS_KEY=somethingelse") is None
    assert m.find(VALUE[:10]) is None  # a fragment shorter than any fingerprint
    for _ in range(200):
        assert m.find(rng.randbytes(1500)) is None
    assert SecretMatcher().find(VALUE) is None


def test_a_long_value_is_found_by_its_middle() -> None:
    key = b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + base64.b64encode(random.Random(1)
                                                                     .randbytes(600))
    m = SecretMatcher()
    m.add({"DEPLOY_KEY": key})
    assert m.find(key[300:500]) is not None
    other = SecretMatcher()
    other.add({"DEPLOY_KEY": key})
    assert m.find(b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA") is None


def test_scrub_replaces_every_form_and_repr_shows_names_only() -> None:
    m = matcher()
    text = f"/p?t={VALUE.decode()} {base64.b64encode(VALUE).decode()} {VALUE.hex()}" \
           f" {VALUE.decode().lower()}.evil.example"
    out = m.scrub(text)
    assert "[secret AWS_SECRET_ACCESS_KEY]" in out and m.find(out.encode()) is None
    assert VALUE.decode() not in repr(m) and "AWS_SECRET_ACCESS_KEY" in repr(m)
    # percent-escapes that split a value: the whole string goes
    split = "x=" + "".join(f"%{c:02x}" for c in VALUE)
    assert m.find(m.scrub(split).encode()) is None


def test_scrub_record_copies_only_when_needed() -> None:
    m = matcher()
    clean: dict[str, object] = {"type": "dns", "build": {"id": "b1"},
                                "query": {"name": "pkg.test.example"}}
    assert scrub_record(clean, m) is clean
    dirty: dict[str, object] = {"type": "connection",
                                "process": {"argv": ["x", VALUE.decode()]}, VALUE.decode(): 1}
    out = scrub_record(dirty, m)
    assert VALUE.decode() not in repr(out)
    assert out["process"] == {"argv": ["x", "[secret AWS_SECRET_ACCESS_KEY]"]}


def test_one_environment_is_selected_once() -> None:
    m = SecretMatcher()
    assert not m.seen_environ(ENVIRON) and m.seen_environ(ENVIRON)


@pytest.mark.parametrize("junk", [b"", b"\0" * 100, b"=" * 1000, b"\xff\xfe=\x00\x80" * 50,
                                  b"A=" + b"\x80" * 100_000, b"%" * 5000, b"%zz%" * 100])
def test_select_find_and_scrub_are_total(junk: bytes) -> None:
    m = SecretMatcher()
    m.add(select(junk))
    m.add({"AWS_SECRET_ACCESS_KEY": VALUE})
    m.find(junk)
    m.scrub(junk.decode("latin-1"))
    m.scrub("\ud800" + VALUE.decode())


def test_a_policy_adds_secret_names_and_ignores_others() -> None:
    from egress_monitor.detect.secrets import rules_for
    from egress_monitor.policy.loader import parse_policy

    policy = parse_policy("version: 1\nsecrets:\n  names: [EM_ACTIONS]\n  ignore: [RANDOM_BLOB]\n")
    rules = rules_for(policy.secret_names, policy.secret_ignore)
    assert sorted(select(ENVIRON, rules)) == ["AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
                                              "EM_ACTIONS", "GITHUB_TOKEN"]
    assert "PATH" in rules.ignore  # the built-in list still holds


def test_credential_file_values_are_found_by_shape_and_by_keyword() -> None:
    from egress_monitor.detect.secrets import SecretMatcher, file_secrets

    aws = (b"[default]\naws_access_key_id = AKIAZ7FAKE0EXAMPLE12\n"
           b"aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEfake\n"
           b"region = eu-west-1\n")
    netrc = b"machine example.org login ci password hunter2hunter2\n"
    found = file_secrets(".aws/credentials", aws)
    assert set(found.values()) == {b"AKIAZ7FAKE0EXAMPLE12",
                                   b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEfake"}
    assert all(name.startswith("file .aws/credentials") for name in found)
    assert file_secrets(".netrc", netrc) == {"file .netrc": b"hunter2hunter2"}
    assert file_secrets("x", b"") == {} and file_secrets("x", b"\xff" * 100) == {}
    matcher = SecretMatcher()
    matcher.add(found)
    hit = matcher.find(b"GET /?k=wJalrXUtnFEMI%2FK7MDENG%2FbPxRfiCYzEXAMPLEfake HTTP/1.1\r\n")
    assert hit is not None and hit.names[0].startswith("file .aws/credentials")


def test_every_line_of_a_pem_body_is_key_material() -> None:
    from egress_monitor.detect.secrets import SecretMatcher, file_secrets

    body = [b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW",
            b"QyNTUxOQAAACD+/a/b/c/d/e/f0g1h2i3j4k5l6m7n8o9p0q1r2s3t4u5v6w7x8y9z0AAA"]
    pem = b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + b"\n".join(body) + \
        b"\n-----END OPENSSH PRIVATE KEY-----\n"
    found = file_secrets(".ssh/id_ed25519", pem)
    assert set(body) <= set(found.values())
    matcher = SecretMatcher()
    matcher.add(found)
    assert matcher.find(b"POST / HTTP/1.1\r\n\r\n" + b"\n".join(body)) is not None
