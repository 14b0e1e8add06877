"""OpenAI-compatible batch jobs: files of requests run on Celery through the gateway, at the batch discount."""
