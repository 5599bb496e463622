"""Everything a run writes for people and tools: its record, model card, terminal tables and HTML report."""
