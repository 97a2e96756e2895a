"""The durable study queue: schema, state machine, claim/lease/heartbeat and migrations.
Never imports :mod:`worker`."""
