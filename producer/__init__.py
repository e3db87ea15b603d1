"""The client side of OpenLoRA: the wire protocol, Redis key names and the Python clients."""
from producer.aio import AsyncClient, AsyncJobHandle
from producer.client import Client, JobHandle
from producer.errors import JobNotFoundError, JobTimeoutError, JobValidationError, ProducerError, QueueFullError
from producer.keys import ShardRouter
from producer.protocol import Chunk, Job, JobResult, Params

__all__ = ["AsyncClient", "AsyncJobHandle", "Chunk", "Client", "Job", "JobHandle", "JobNotFoundError", "JobResult",
           "JobTimeoutError", "JobValidationError", "Params", "ProducerError", "QueueFullError", "ShardRouter"]
