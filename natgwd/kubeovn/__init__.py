"""Kube-OVN: importing its objects, and the drop-in for its nat-gateway.sh."""
