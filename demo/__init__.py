"""`make demo`: the sample flows end to end through the local host."""
