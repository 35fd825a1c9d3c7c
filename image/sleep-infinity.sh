#!/bin/sh
# Installed as /opt/natgwd/bin/sleep, first on the image's PATH. kube-ovn-controller gives the
# vpc-nat-gw container the command `sleep infinity`: that starts natgwd instead, taking the
# calls of /kube-ovn/nat-gateway.sh on its edit endpoint (loopback, any free port; the port
# and token go to NATGWD_EDIT_TOKEN), so the natgwd image can replace Kube-OVN's
# vpc-nat-gateway image with the controller unchanged. Any other sleep is the real one.
# /metrics, /healthz and /readyz are served on 127.0.0.1:9469 and, once `init` wrote a state,
# on the pod's own address (eth0's) for Prometheus: natgwd's default, `auto` (the controller
# writes the pod spec, so nothing could narrow a wider default); never on the EIPs or the
# external network.
# The pod's name goes to --discover-members: a replica of the controller's Deployment
# (VpcNatGateway spec.replicas > 1, pods vpc-nat-gw-GATEWAY-HASH-XXXXX) finds the other
# replicas by a hello on the LAN and scales out with them (docs/scaling-out.md); the
# StatefulSet's single gateway (vpc-nat-gw-GATEWAY-0) runs as before.
# NATGWD_PROGRAM and NATGWD_HA_RUN_DIR exist for tests that run several replicas on one host.
if [ "$#" -eq 1 ] && [ "$1" = infinity ]; then
    # shellcheck disable=SC3028 # not the shell's: the kubelet puts the pod's name in the environment
    exec "${NATGWD_PROGRAM:-/opt/natgwd/bin/natgwd}" run \
        --state "${NATGWD_STATE:-/etc/natgwd/state.json}" \
        --applied-state "${NATGWD_APPLIED_STATE:-/var/lib/natgwd/applied.json}" \
        --edit-port 0 \
        --edit-token "${NATGWD_EDIT_TOKEN:-/var/lib/natgwd/edit.token}" \
        --ha-run-dir "${NATGWD_HA_RUN_DIR:-/run/natgwd}" \
        --discover-members "${HOSTNAME:-}"
fi
exec /bin/sleep "$@"
