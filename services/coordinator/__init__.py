from services.coordinator.service import Coordinator

__all__ = ["Coordinator"]
