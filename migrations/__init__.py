"""Alembic environment and revisions for the logprobe schema (``api_client.schema``)."""
