from services.dispatcher.service import Dispatcher

__all__ = ["Dispatcher"]
