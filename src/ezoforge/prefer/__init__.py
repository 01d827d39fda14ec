"""`ezo prefer`: preference pairs graded by the recipe's judge, then DPO after the SFT (run.py)."""
