"""The running daemon: reconciling, the watch loop, HTTP endpoints, metrics, notifications, logs."""
