"""Segment file arrival: a CDP audience export landing in the `segments` container."""
