"""The only modules that talk to netlink, /proc and the packet queue."""
