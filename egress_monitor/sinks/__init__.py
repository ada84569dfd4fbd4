"""Where events go: the JSON-lines log and Prometheus metrics."""
