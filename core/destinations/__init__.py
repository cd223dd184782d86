"""Destinations: one module per destination behind `base.Destination`."""
