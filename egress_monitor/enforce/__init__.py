"""Kernel state the daemon owns: its firewall chain and its build cgroups."""
