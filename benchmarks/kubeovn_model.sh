#!/bin/bash
# A model of Kube-OVN's nat-gateway.sh, for natgwd's comparative benchmark (per-rule
# exec): the commands the script runs for each NAT subcommand at HEAD, as described in
# shared/reference/kubeovn-vpc-nat-gw.md (sections 1.3-1.5), with the iptables-legacy
# backend the script picks. Written from that description, not copied.
#
# Per call: bash starts; check_inited dumps the nat table (iptables-save -t nat | grep);
# the idempotency check dumps the whole ruleset (iptables-save | grep); then one
# `iptables -t nat -A/-I/-D`, which in the legacy backend reads and rewrites the whole
# table. dnat-del also runs `conntrack -D`, eip-add `ip addr replace` and
# `ip route replace default`.
#
# Left out: arping (eip-add sends 3 gratuitous ARPs, about 2 s), QoS, routes, and the
# controller's transport (an exec through the API server and kubelet per call), so this is
# a lower bound on the real cost.
#
#   kubeovn_model.sh init
#   kubeovn_model.sh eip-add IP/PREFIX
#   kubeovn_model.sh floating-ip-add EIP,INTERNAL_IP
#   kubeovn_model.sh snat-add EIP,CIDR[,--random-fully]
#   kubeovn_model.sh dnat-add EIP,PORT,PROTOCOL,INTERNAL_IP,INTERNAL_PORT
#   kubeovn_model.sh dnat-del EIP,PORT,PROTOCOL
#   kubeovn_model.sh run CALLS_FILE PROGRESS_FILE   (one `bash $0 SUB ARG` per line)
set -u
ipt="iptables-legacy -w"
ipt_save=iptables-legacy-save
VPC_INTERFACE=${VPC_INTERFACE:-net1}
EXTERNAL_INTERFACE=${EXTERNAL_INTERFACE:-net2}

exec_cmd() {
    "$@"
    local ret=$?
    if [ $ret -ne 0 ]; then
        echo "failed to exec command \"$*\"" >&2
        exit $ret
    fi
}

check_inited() {
    if ! $ipt_save -t nat | grep SNAT_FILTER | grep -q SHARED_SNAT; then
        echo "nat gateway not initialized" >&2
        exit 1
    fi
}

init() {
    $ipt_save | grep -q DNAT_FILTER && exit 0
    for chain in DNAT_FILTER SNAT_FILTER EXCLUSIVE_DNAT EXCLUSIVE_SNAT SHARED_DNAT SHARED_SNAT HAIRPIN_SNAT; do
        exec_cmd $ipt -t nat -N $chain
    done
    exec_cmd $ipt -t mangle -N VPC_MARK
    exec_cmd $ipt -t nat -A PREROUTING -j DNAT_FILTER
    exec_cmd $ipt -t nat -A DNAT_FILTER -j EXCLUSIVE_DNAT
    exec_cmd $ipt -t nat -A DNAT_FILTER -j SHARED_DNAT
    exec_cmd $ipt -t nat -A POSTROUTING -j SNAT_FILTER
    exec_cmd $ipt -t nat -A SNAT_FILTER -j EXCLUSIVE_SNAT
    exec_cmd $ipt -t nat -A SNAT_FILTER -j SHARED_SNAT
    exec_cmd $ipt -t nat -A SNAT_FILTER -j HAIRPIN_SNAT
    exec_cmd $ipt -t mangle -A PREROUTING -j VPC_MARK
    exec_cmd $ipt -t mangle -A VPC_MARK -i "$VPC_INTERFACE" -j MARK --set-xmark 0x1/0x1
}

eip_add() {
    check_inited
    local rule eip ip
    for rule in "$@"; do
        eip=${rule%%,*}
        ip=${eip%/*}
        exec_cmd ip addr replace "$eip" dev "$EXTERNAL_INTERFACE"
        # arping -I $EXTERNAL_INTERFACE -c 3 -U $ip: left out
        local hairpin=(HAIRPIN_SNAT -m mark --mark 0x1/0x1 -o "$VPC_INTERFACE" -m conntrack --ctstate DNAT
            --ctorigdst "$ip" -j SNAT --to-source "$ip" --random-fully)
        if ! $ipt -t nat -C "${hairpin[@]}" 2>/dev/null; then
            exec_cmd $ipt -t nat -A "${hairpin[@]}"
        fi
    done
    if [ -n "${GATEWAY_V4:-}" ]; then
        exec_cmd ip route replace default via "$GATEWAY_V4" dev "$EXTERNAL_INTERFACE" onlink
    fi
}

floating_ip_add() {
    check_inited
    local rule eip internal existing
    for rule in "$@"; do
        IFS=, read -r eip internal <<<"$rule"
        eip=${eip%/*}
        existing=$($ipt_save | grep EXCLUSIVE_DNAT | grep -w -- "-d $eip/32" | grep destination)
        if [ -n "$existing" ]; then
            if grep -qw -- "--to-destination $internal" <<<"$existing"; then
                continue
            fi
            echo "EIP $eip is already used by a FIP" >&2
            exit 1
        fi
        exec_cmd $ipt -t nat -A EXCLUSIVE_DNAT -d "$eip" -j DNAT --to-destination "$internal"
        exec_cmd $ipt -t nat -A EXCLUSIVE_SNAT -s "$internal" -j SNAT --to-source "$eip"
    done
}

snat_add() {
    check_inited
    local rule eip cidr option prefix position
    for rule in "$@"; do
        IFS=, read -r eip cidr option <<<"$rule"
        eip=${eip%/*}
        if $ipt_save | grep SHARED_SNAT | grep -w -- "-s $cidr" | grep -qw -- "--to-source $eip"; then
            continue
        fi
        # Longest prefix first: after every rule whose prefix is at least as long.
        prefix=${cidr#*/}
        position=$($ipt_save -t nat | awk -v p="$prefix" '
            $1 == "-A" && $2 == "SHARED_SNAT" {
                for (i = 3; i < NF; i++) if ($i == "-s") { split($(i + 1), a, "/"); if (a[2] + 0 >= p) n++ }
            }
            END { print n + 1 }')
        # shellcheck disable=SC2086 # $option is empty or one word
        exec_cmd $ipt -t nat -I SHARED_SNAT "$position" -o "$EXTERNAL_INTERFACE" -s "$cidr" -j SNAT \
            --to-source "$eip" $option
    done
}

dnat_add() {
    check_inited
    local rule eip port proto internal internal_port existing
    for rule in "$@"; do
        IFS=, read -r eip port proto internal internal_port <<<"$rule"
        eip=${eip%/*}
        existing=$($ipt_save | grep SHARED_DNAT | grep -w -- "-d $eip/32" | grep -- "-p $proto" |
            grep -w -- "--dport $port")
        if [ -n "$existing" ]; then
            if grep -qw -- "--to-destination $internal:$internal_port" <<<"$existing"; then
                continue
            fi
            echo "DNAT $eip:$port/$proto exists with another target" >&2
            exit 1
        fi
        exec_cmd $ipt -t nat -A SHARED_DNAT -p "$proto" -d "$eip" --dport "$port" -j DNAT \
            --to-destination "$internal:$internal_port"
    done
}

dnat_del() {
    check_inited
    local rule eip port proto line
    for rule in "$@"; do
        IFS=, read -r eip port proto _ <<<"$rule"
        eip=${eip%/*}
        line=$($ipt_save -t nat | grep -- "^-A SHARED_DNAT" | grep -w -- "-d $eip/32" | grep -- "-p $proto" |
            grep -w -- "--dport $port" | head -n 1)
        if [ -n "$line" ]; then
            # shellcheck disable=SC2086 # the saved rule, word by word
            exec_cmd $ipt -t nat -D ${line#-A }
        fi
        conntrack -D -d "$eip" -p "$proto" --dport "$port" >/dev/null 2>&1 || true
    done
}

run_calls() {
    # One process per call, as the controller execs the script once per rule.
    local calls=$1 progress=$2 sub arg done=0
    exec 3>>"$progress"
    while read -r sub arg; do
        if ! bash "$0" "$sub" "$arg" >/dev/null; then
            echo "call $((done + 1)) failed: $sub $arg" >&2
            exit 1
        fi
        done=$((done + 1))
        echo "$done" >&3
    done <"$calls"
}

opt=${1:-}
shift || true
case $opt in
init) init ;;
eip-add) eip_add "$@" ;;
floating-ip-add) floating_ip_add "$@" ;;
snat-add) snat_add "$@" ;;
dnat-add) dnat_add "$@" ;;
dnat-del) dnat_del "$@" ;;
run) run_calls "$@" ;;
*)
    echo "usage: $0 init|eip-add|floating-ip-add|snat-add|dnat-add|dnat-del|run ..." >&2
    exit 2
    ;;
esac
