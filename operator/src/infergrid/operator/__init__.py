"""infergrid operator."""
