"""Local development host for the function app (not deployed; see README, Local runner)."""
