"""Routed EIPs: EIPs announced over BGP (with BFD) by FRR, supervised by natgwd."""
