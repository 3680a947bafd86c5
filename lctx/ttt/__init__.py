"""Test-time training for long context: qTTT (qttt.py) and PERK (perk.py)."""
