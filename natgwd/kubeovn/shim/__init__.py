"""A drop-in `nat-gateway.sh` for natgwd: Kube-OVN's gateway script, as edits of natgwd's
desired state.

kube-ovn-controller execs `bash /kube-ovn/nat-gateway.sh <subcommand> <rule>...` in the
gateway pod, one rule per call. Each call is parsed with the script's argument formats
(`grammar`), becomes an edit of the desired-state document with the script's semantics
(`edits`, `qos`, `init`; `call` ties them together), and returns once natgwd has applied
it. Two ways carry a call to natgwd:

- natgwd's edit endpoint (`natgwd run --edit-port`, as the image runs it): the bash
  nat-gateway.sh sends the call over loopback (`protocol`, `endpoint`); natgwd carries it
  out on its reconciling thread against the document it holds, applies it, appends it to
  the edit log beside the state file (`editlog`, `service`) and answers. Milliseconds per
  call, whatever the size of the state.
- without an endpoint, `python -m natgwd.kubeovn.shim` edits the state file itself under a
  lock and waits for natgwd's applied-state record (`filestate`, `waiting`, `cli`).

Kube-OVN's lb-svc.sh (a LoadBalancer Service's pod, same image) is `nat-gateway.sh lb-svc
COMMAND RULE...`: the same ways to natgwd, its own edits (`lbsvc`).

Environment: NATGWD_STATE (default /etc/natgwd/state.json), NATGWD_APPLIED_STATE (default
/var/lib/natgwd/applied.json), NATGWD_EDIT_TOKEN (default /var/lib/natgwd/edit.token: the
endpoint's port and secret; the endpoint is used when it exists), NATGWD_SHIM_TIMEOUT
(seconds, default 30; 0 = do not wait for natgwd in the file protocol), GATEWAY_V4 (the
external gateway, as the controller sets it in the pod). nat-gateway.sh alone reads
NATGWD_PYTHON: the Python with natgwd installed that it runs when there is no endpoint
(default /opt/natgwd/bin/python, the image's).

Exit codes as the script's: 0 done (or nothing to do), 1 refused or failed, 2 a
`subnet-route-del` of a route that is nowhere (`ip route del`'s code). Warnings go to
stderr prefixed "Warning:", which the controller does not count as an error.
"""
