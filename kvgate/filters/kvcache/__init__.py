"""dgp.filter.ai.kvcache (being written)."""
