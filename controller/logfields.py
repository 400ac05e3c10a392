"""Names of the structured fields Shoal puts into log records' ``extra``.

Kept in one place so log aggregators can rely on them, and so a rename is one edit.
"""

POOL = "pool"
WORKER_ID = "worker_id"
CONTAINER_ID = "container_id"
CONTAINER_NAME = "container_name"
HOST_PORT = "host_port"
TASK_ID = "task_id"
TRACE_ID = "trace_id"
OBSERVED = "observed"
DESIRED = "desired"
ACTION = "action"
REASON = "reason"
ATTEMPT = "attempt"
