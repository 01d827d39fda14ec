"""`ezo eval`: ELYZA-tasks-100 with an LLM judge, JCommonsenseQA, held-out perplexity, and comparisons."""
