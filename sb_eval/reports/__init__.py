"""Reports people read: Markdown tables and PNG plots made from results on disk."""
