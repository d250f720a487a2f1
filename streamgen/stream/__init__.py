"""Stream: the processes and shared memory between generators and trainer ranks.

`queue` (one `SlotQueue` of shared-memory slots per trainer rank), `worker` (the body of a
generator process), `supervisor` (owns the generators: dispatch, restarts, watchdog),
`heartbeat` (trainer liveness) and `control` (the launcher's stop request). No deep learning
beyond the generators' own; imports `plan` and `generate`.
"""
