"""Eval task types, one module each (base.py: what a type declares); eval/tasks.py registers them."""
