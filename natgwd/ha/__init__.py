"""High availability: the ha section, keepalived and conntrackd configurations, their supervision, roles."""
