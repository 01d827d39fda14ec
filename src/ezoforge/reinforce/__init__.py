"""`ezo reinforce`: GRPO after the SFT (or SFT → DPO), rewarded by named, weighted functions (run.py)."""
