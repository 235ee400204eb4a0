"""The `sectors` command-line interface."""
