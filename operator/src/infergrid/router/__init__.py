"""infergrid router."""
