from services.aggregator.service import Aggregator

__all__ = ["Aggregator"]
