"""Provider webhooks: signed callbacks become stored events and suppression changes
(flow 5 of the brief). See receive.py (the answer) and processing.py (the work)."""
