from services.api.service import Api

__all__ = ["Api"]
