"""logprobe's worker side: the Celery app and task, backends (hf, openai), persistence.

Importing this package imports neither torch nor transformers; backends load
lazily in the process that runs tasks.
"""
