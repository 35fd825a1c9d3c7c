"""Where natgwd's files are unless told otherwise: the daemon's options and the drop-in's
environment default to the same places."""

from __future__ import annotations

from pathlib import Path

STATE = Path("/etc/natgwd/state.json")
APPLIED_STATE = Path("/var/lib/natgwd/applied.json")
PORT_BLOCK_HISTORY = Path("/var/lib/natgwd/port-blocks.json")  # beside the applied state's record
EDIT_TOKEN = Path("/var/lib/natgwd/edit.token")
HA_RUN_DIR = Path("/run/natgwd")  # keepalived's and conntrackd's files
BGP_RUN_DIR = Path("/run/natgwd/bgp")  # FRR's
