"""The DNS guard: the daemon is the resolver for every build (sans-IO core + a server)."""
