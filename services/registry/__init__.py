from services.registry.service import Registry

__all__ = ["Registry"]
