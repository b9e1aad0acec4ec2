"""Pure-stdlib pieces shared by the worker and the operator's router (no torch, no third-party imports)."""
