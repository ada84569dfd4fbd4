"""Read what a build sends first (pure): HTTP request heads, TLS ClientHello names."""
