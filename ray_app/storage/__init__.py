from ray_app.storage.base import AuditStore, JobStore, LogStore
from ray_app.storage.registry import open_audit_store, open_job_store, open_log_store

__all__ = ["AuditStore", "JobStore", "LogStore", "open_audit_store", "open_job_store", "open_log_store"]
