"""Pleo Key Broker: holds Pleo Integrated API Keys so that no other service has to."""

__version__ = "0.1.0"
