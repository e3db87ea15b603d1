"""Every table of OpenLoRA; importing this module registers them on ``SQLModel.metadata``."""

from db.adapters import Adapter, AdapterOwnershipError, Visibility, register_adapter, validate_adapter_id
from db.base import UTCDateTime, utcnow
from db.jobs import BatchRun, BatchRunStatus, Job, JobMode, JobStatus
from db.usage import UsageDaily, record_usage

__all__ = [
    "Adapter", "AdapterOwnershipError", "BatchRun", "BatchRunStatus", "Job", "JobMode",
    "JobStatus", "UTCDateTime", "UsageDaily", "Visibility", "record_usage",
    "register_adapter", "utcnow", "validate_adapter_id",
]
