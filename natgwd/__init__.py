"""natgwd: the data plane of a VPC NAT gateway, reconciled from a desired-state file."""

__version__ = "0.1.0"
