"""Policy: the platform team's YAML, parsed, validated and frozen."""
