"""Child processes natgwd runs and keeps running: HA's (keepalived, conntrackd) and BGP's
(FRR). Below both packages, which share the supervisor."""
