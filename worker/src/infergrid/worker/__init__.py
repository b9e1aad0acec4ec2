"""infergrid worker."""
