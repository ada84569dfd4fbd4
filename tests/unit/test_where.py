"""The netns / container fields of DNS records and alerts (where.py)."""

from egress_monitor.containers import Container
from egress_monitor.where import where_fields


def test_where_fields() -> None:
    assert where_fields(None, 5, None) == {}
    assert where_fields(5, 5, None) == {}  # the daemon's own namespace is not named
    assert where_fields(7, None, None) == {}  # ours unknown: never guess
    assert where_fields(7, 5, Container("docker", "a" * 64)) == {
        "netns": 7, "container": {"runtime": "docker", "id": "a" * 64, "pod": None}}
    assert where_fields(7, 5, None, {"engine": "docker"}) == {
        "netns": 7, "launched_by": {"engine": "docker"}}
