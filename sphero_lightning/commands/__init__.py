"""The `sphero` commands: the dispatcher and ingest, apply, export, demo."""
