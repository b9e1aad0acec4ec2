"""Autoscaler and health monitor: scrape the workers' metrics, decide (pure functions), act (leader only)."""
