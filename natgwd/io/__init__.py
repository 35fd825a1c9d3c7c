"""Files natgwd reads and writes whole: the state file, atomic writes, the applied-state
record. Below runtime and kubeovn, which both use them."""
