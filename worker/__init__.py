"""The application: configuration, CLI, pipeline orchestration and scheduler jobs."""

__version__ = "0.1.0"
