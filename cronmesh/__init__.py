"""cronmesh: a fault-tolerant distributed cron scheduler that speaks Dkron's API."""

__version__ = "0.1.0"
