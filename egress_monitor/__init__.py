"""egress-monitor: watch and gate the network egress of Rust builds on CI runners."""

__version__ = "0.1.0"
