"""The calls of Kube-OVN's lb-svc.sh, as edits of natgwd's desired state.

kube-ovn-controller runs a LoadBalancer Service of a Kube-OVN attachment network in a pod of
its own (Deployment `lb-svc-<service>`, the vpc-nat-gateway image): eth0 on the pod
network, net1 on the attachment network holding the Service's load-balancer IP. It execs
`bash /kube-ovn/lb-svc.sh COMMAND RULE` there: `init`, then `eip-add LBIP/PREFIX,GATEWAY`
(the attachment's gateway), then per port `dnat-add LBIP,PORT,PROTOCOL,CLUSTER_IP,
TARGET_PORT,POD_GATEWAY` (eth0's gateway); `dnat-del LBIP,PORT,PROTOCOL,CLUSTER_IP,
TARGET_PORT` for a port the Service no longer has. The image's lb-svc.sh is
`nat-gateway.sh lb-svc COMMAND RULE...`: the same transport, these edits.

In natgwd's terms: internal = eth0 with `masquerade` (the cluster IP's backends answer the
pod, not the client), external = net1, the load-balancer IP an EIP, the attachment's
gateway the external gateway for forwarded packets only (`defaultRoute: "forwarded"`, as
the script's `ip rule iif net1|eth0 lookup 100`), each cluster IP an internal route via
eth0's gateway, each port an exclusive DNAT rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from natgwd.kubeovn.shim import edits, grammar
from natgwd.kubeovn.shim.edits import Context, Doc, Op, eip_named, section_items
from natgwd.kubeovn.shim.grammar import ShimError
from natgwd.kubeovn.shim.init import PRIMARY_CNI_EXTERNAL_INTERFACE, PRIMARY_CNI_VPC_INTERFACE, Links, init_op

COMMAND = "lb-svc"  # nat-gateway.sh's first argument for an lb-svc.sh call

USAGE = """\
Usage: lb-svc.sh COMMAND RULE...   (natgwd: each call edits the desired state)

  init                                                     eth0 (pod network), net1 (the Service's network)
  eip-add LB_IP/PREFIX,GATEWAY                             the load-balancer IP and net1's gateway
  dnat-add LB_IP,PORT,PROTOCOL,CLUSTER_IP,TARGET_PORT,POD_GATEWAY   a Service port (tcp or udp)
  dnat-del LB_IP,PORT,PROTOCOL,CLUSTER_IP,TARGET_PORT      a port the Service no longer has
  help

Environment: as nat-gateway.sh's (NATGWD_STATE, NATGWD_APPLIED_STATE, NATGWD_EDIT_TOKEN, NATGWD_SHIM_TIMEOUT)."""


def lb_init(rules: Sequence[str], links: Links) -> Callable[[Doc | None, Context], Doc]:
    """The script's `init` takes no arguments: eth0 and net1, as nat-gateway.sh's `init
    eth0,net1` (a first state from what the CNI configured, or natgwd's rules still in the
    kernel after a container restart), with masquerading to eth0 and the default route for
    forwarded packets only, as the script's table 100: the pod keeps eth0's."""
    if rules:
        raise ShimError(f"natgwd: lb-svc.sh init takes no arguments, not {' '.join(rules)!r}")
    interfaces = init_op((f"{PRIMARY_CNI_VPC_INTERFACE},{PRIMARY_CNI_EXTERNAL_INTERFACE}",), links)

    def op(doc: Doc | None, ctx: Context) -> Doc:
        doc = interfaces(doc, ctx)
        doc["internal"]["masquerade"] = True
        doc["external"]["defaultRoute"] = "forwarded"
        return doc

    return op


def parse_eip_add(rule: str) -> Op:
    grammar.address(grammar.fields(rule, 2, 2, "LB_IP/PREFIX,GATEWAY")[1], "gateway")
    return edits.parse_eip_add(rule)  # its v1.12 form: the gateway becomes external.gateway


def _target(rule: str, fields: list[str]) -> tuple[str, str]:
    protocol, internal_ip, internal_port = fields[2:5]
    if protocol.lower() == "sctp":
        raise ShimError(f"natgwd: bad rule {rule!r}: natgwd translates tcp and udp, not sctp")
    return str(grammar.address(internal_ip, "cluster IP")), grammar.port(internal_port, "target port")


def parse_dnat_add(rule: str) -> Op:
    fields = grammar.fields(rule, 6, 6, "LB_IP,PORT,PROTOCOL,CLUSTER_IP,TARGET_PORT,POD_GATEWAY")
    internal_ip, _ = _target(rule, fields)
    route = edits.parse_route_add(f"{internal_ip}/32,{fields[5]}")  # the script's route in table 100
    dnat = edits.parse_dnat_add(",".join(fields[:5]))

    def op(doc: Doc, ctx: Context) -> None:
        route(doc, ctx)
        dnat(doc, ctx)

    return op


def parse_dnat_del(rule: str) -> Op:
    """As the script's `iptables -C` then `-D` of the whole rule: the DNAT goes only when it
    has this target; the cluster IP's route stays (the script keeps it too)."""
    fields = grammar.fields(rule, 5, 5, "LB_IP,PORT,PROTOCOL,CLUSTER_IP,TARGET_PORT")
    internal_ip, internal_port = _target(rule, fields)
    eip, port = grammar.address(fields[0], "LB IP"), grammar.port(fields[1], "port")
    protocol = grammar.protocol(fields[2])
    delete = edits.parse_dnat_del(",".join(fields[:3]))

    def op(doc: Doc, ctx: Context) -> None:
        name = eip_named(doc, eip, ctx)
        for dnat in section_items(doc, "dnat"):
            if edits.identity_matches(dnat, name, protocol, port) and dnat.get("type") != "share":
                if dnat.get("internalIp") == internal_ip and edits.norm_port(dnat.get("internalPort")) == internal_port:
                    delete(doc, ctx)
                else:
                    ctx.warnings.append(
                        f"{protocol}/{port} on {eip} goes to {dnat.get('internalIp')}:{dnat.get('internalPort')}, "
                        f"not {internal_ip}:{internal_port}: kept"
                    )
                return

    return op


EDITS: dict[str, Callable[[str], Op]] = {
    "eip-add": parse_eip_add,
    "dnat-add": parse_dnat_add,
    "dnat-del": parse_dnat_del,
}
