"""Thin shells around the kernel (nftables, netlink, conntrack, ARP) and the in-memory fake."""
