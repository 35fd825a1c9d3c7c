#!/bin/sh
exec "${NATGWD_PYTHON:-/opt/natgwd/bin/python}" -m natgwd.kubeovn.shim "$@"
