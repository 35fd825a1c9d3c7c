"""Pure planning: from a desired state to the table, links and conntrack verdicts the kernel should have."""
