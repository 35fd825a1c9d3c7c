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
if [ "$#" -eq 1 ] && [ "$1" = infinity ]; then
    exec /opt/natgwd/bin/natgwd run \
        --state "${NATGWD_STATE:-/etc/natgwd/state.json}" \
        --applied-state "${NATGWD_APPLIED_STATE:-/var/lib/natgwd/applied.json}" \
        --edit-port 0 \
        --edit-token "${NATGWD_EDIT_TOKEN:-/var/lib/natgwd/edit.token}"
fi
exec /bin/sleep "$@"
