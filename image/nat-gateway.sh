#!/bin/bash
# Kube-OVN's gateway script, for natgwd: kube-ovn-controller execs
# `bash /kube-ovn/nat-gateway.sh COMMAND RULE...` and each call edits natgwd's desired state.
# Where natgwd takes calls on loopback (`natgwd run --edit-port`, its token file exists), the
# call goes there in one round trip: a bash process and no Python start per call. Otherwise
# `python -m natgwd.kubeovn.shim` edits the state file itself (NATGWD_PYTHON: the Python
# with natgwd installed, default the image's). Both parse the call alike.
token_file=${NATGWD_EDIT_TOKEN:-/var/lib/natgwd/edit.token}
if [ ! -e "$token_file" ]; then
    python=${NATGWD_PYTHON:-/opt/natgwd/bin/python}
    if [ ! -x "$python" ]; then
        echo "natgwd: no edit endpoint token at $token_file (NATGWD_EDIT_TOKEN), and no Python at" \
            "$python to edit the state file instead (NATGWD_PYTHON: the Python with natgwd installed)" >&2
        exit 1
    fi
    exec "$python" -m natgwd.kubeovn.shim "$@"
fi

if [ ! -r "$token_file" ]; then
    echo "natgwd: cannot read $token_file (natgwd's edit endpoint takes calls from root only)" >&2
    exit 1
fi
timeout=${NATGWD_SHIM_TIMEOUT:-30}
[[ $timeout =~ ^[0-9]+(\.[0-9]+)?$ && $timeout != 0 && $timeout != 0.0 ]] || timeout=30
# The deadline in microseconds, from EPOCHREALTIME (no fork). The controller's `init` may
# come before natgwd listens: keep trying until then.
seconds=${timeout%.*}
fraction=${timeout#"$seconds"}
fraction=${fraction#.}000000
now=${EPOCHREALTIME/[.,]/}
deadline=$((10#$now + 10#$seconds * 1000000 + 10#${fraction:0:6}))
# The timeout bounds the whole call: bash's /dev/tcp connect has no timeout of its own (a
# SYN nobody answers is retried for two minutes), and neither has a write to a peer that
# stops reading, so a watchdog ends the call at the deadline while it connects and sends.
# The wait for the reply is bounded by `read -t`. The watchdog costs one fork and no exec:
# a subshell timed by the `read -t` builtin on a pipe whose writing end (fd 5) this shell
# alone holds. Closing fd 5 once the request is sent ends it (EOF) while natgwd works, off
# the call's path, with no kill; only its timeout signals this shell. It holds neither the
# caller's stdout nor its stderr: a watchdog that outlived the call holding them would keep
# the caller (the controller's exec, which waits for the end of the output) waiting.
# (To fd 4, stderr: the connect below runs with its stderr silenced.)
exec 4>&2
trap 'echo "natgwd: its edit endpoint ($token_file) did not answer within ${timeout}s" >&4; exit 1' TERM
exec 5> >(
    exec >/dev/null 2>&1 4>&-
    read -r -t "$timeout"
    (($? > 128)) && kill -TERM "$$"
)
while :; do
    port='' token=''
    { read -r port token <"$token_file"; } 2>/dev/null
    if [[ $port =~ ^[0-9]{1,5}$ && -n $token ]] && { exec 3<>"/dev/tcp/127.94.69.1/$port"; } 2>/dev/null; then
        break
    fi
    now=${EPOCHREALTIME/[.,]/}
    if ((10#$now >= deadline)); then
        echo "natgwd: its edit endpoint ($token_file) did not answer within ${timeout}s" >&2
        exit 1
    fi
    sleep 0.05
done

# natgwd may answer (a refusal) before it has read everything: its reply still comes.
trap '' PIPE
printf '%s\0' natgwd-edit/1 "$token" "${GATEWAY_V4:-}" "$#" "$@" >&3 2>/dev/null
exec 5>&-
now=${EPOCHREALTIME/[.,]/}
wait_for=$(((deadline - 10#$now) / 1000000 + 1))
((wait_for >= 1)) || wait_for=1
if ! { IFS= read -r -d '' -t "$wait_for" code && IFS= read -r -d '' out && IFS= read -r -d '' err; } <&3 ||
    [[ ! $code =~ ^[0-9]{1,3}$ ]]; then
    echo "natgwd: no reply from its edit endpoint within ${timeout}s" >&2
    exit 1
fi
exec 3<&-
printf '%s' "$out"
printf '%s' "$err" >&2
exit "$code"
