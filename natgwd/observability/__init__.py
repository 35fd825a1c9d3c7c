"""Conntrack pressure, open connections and port usage from conntrack events, translation logs, top."""
