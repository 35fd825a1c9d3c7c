"""QoS: policies, their HTB/IFB trees, the tc shell that syncs them, and their statistics."""
