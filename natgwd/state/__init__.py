"""The desired state: its model, JSON Schema and validation."""
