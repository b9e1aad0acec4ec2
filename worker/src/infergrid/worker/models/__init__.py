"""Model definitions (plain nn.Modules)."""
