"""Asynchronous and batch jobs: JobService, its store and its workers."""
