"""Names of the blob containers, tables and queues Switchboard uses (see README, Storage)."""

SEGMENTS = "segments"
REJECTS = "rejects"
CDP_EXPORTS = "cdp-exports"
CAMPAIGN_IMPORTS = "campaign-imports"
