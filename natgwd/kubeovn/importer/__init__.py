"""`natgwd import`: the desired state of one Kube-OVN VPC NAT gateway, from its objects.

Reads what `kubectl get -o yaml` or `-o json` prints (a `List`, single objects, or a
multi-document YAML stream; several files or a directory of them) and writes a natgwd
desired-state file (version 1) for one gateway:

- VpcNatGateway `spec.subnet`, `spec.lanIp` and the internal Subnet's `cidrBlock` give the
  internal interface's address; the external Subnet (`spec.externalSubnets[0]`) gives the
  external gateway (`spec.gateway`) and the prefix of the external address.
- The gateway pod (or, without one, its StatefulSet's pod template) gives what the CNI
  configured: the `<provider>.kubernetes.io/routes` annotation of the internal provider
  (routes to the other VPC subnets and service CIDRs through the VPC router), the interface
  names and the external address from `k8s.v1.cni.cncf.io/network-status` or the external
  provider's `ip_address` annotation.
- IptablesEIP (`spec.natGwDp` = the gateway; `spec.v4ip`, else `status.ip`; `spec.v6ip`),
  then the IptablesSnatRule / IptablesDnatRule (`spec.type` exclusive or share) /
  IptablesFIPRule objects whose `spec.eip` is one of those EIPs, of either family.
- Dual-stack Subnets ("10.0.0.0/24,fd00::/64") and annotations give the IPv6 side too: the
  gateway's IPv6 VPC and external addresses, `gateway6` and IPv6 VPC routes.

Nothing is dropped silently: every object or value that does not make it into the state
(another gateway's EIP, a rule naming an unknown EIP, QoS, a route that would shadow
the external subnet, a conflict Kube-OVN's webhook would have refused, ...) is reported as a
Finding, "warning" when NAT behaviour the input asked for is not carried over or was
changed, "note" for context objects that carry nothing natgwd needs. The result is
validated with natgwd.state.validation.load_state before it is written.
"""

from natgwd.kubeovn.importer.cli import main
from natgwd.kubeovn.importer.gateway import ImportResult, import_objects
from natgwd.kubeovn.importer.objects import (
    Finding,
    ImportFailedError,
    ImportOptions,
    parse_documents,
    read_inputs,
    state_name,
)

__all__ = [
    "Finding",
    "ImportFailedError",
    "ImportOptions",
    "ImportResult",
    "import_objects",
    "main",
    "parse_documents",
    "read_inputs",
    "state_name",
]
