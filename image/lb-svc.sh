#!/bin/bash
# Kube-OVN's LoadBalancer-Service script, for natgwd: kube-ovn-controller execs
# `bash /kube-ovn/lb-svc.sh COMMAND RULE` (init, eip-add, dnat-add, dnat-del) in the
# Service's lb-svc pod, which runs this image. Each call is one of nat-gateway.sh's, with
# `lb-svc` first: the same transport to natgwd (its edit endpoint, else the state file), the
# same guarantees, lb-svc.sh's subcommands (natgwd.kubeovn.shim.lbsvc).
exec bash "$(dirname "${BASH_SOURCE[0]}")/nat-gateway.sh" lb-svc "$@"
