#!/bin/sh
# Installed as /opt/natgwd/bin/sleep, first on the image's PATH. kube-ovn-controller gives the
# vpc-nat-gw container the command `sleep infinity`: that starts natgwd instead (on the state
# file that /kube-ovn/nat-gateway.sh edits), so the natgwd image can replace Kube-OVN's
# vpc-nat-gateway image with the controller unchanged. Any other sleep is the real one.
if [ "$#" -eq 1 ] && [ "$1" = infinity ]; then
    exec /opt/natgwd/bin/natgwd run \
        --state "${NATGWD_STATE:-/etc/natgwd/state.json}" \
        --applied-state "${NATGWD_APPLIED_STATE:-/var/lib/natgwd/applied.json}"
fi
exec /bin/sleep "$@"
