"""Webhooks: a message to the job's `spec.webhook.url` each time a job reaches a final status."""
