"""Segment sync: CDP audience exports to destination updates, deltas only."""
