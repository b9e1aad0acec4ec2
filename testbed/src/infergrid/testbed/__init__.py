"""infergrid testbed."""
