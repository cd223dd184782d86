"""Switchboard's logic. Nothing here imports azure.functions; `functions/` adapts triggers."""

__version__ = "0.1.0"
