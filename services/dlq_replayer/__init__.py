from services.dlq_replayer.service import DlqReplayer

__all__ = ["DlqReplayer"]
