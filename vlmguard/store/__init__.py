"""The job table: every SQL statement vlmguard runs lives in this package.

One module per kind of caller, over one shared Database (database.py: the engine, read
and write transactions, wait_for_commit):

- schema: tables, migrations, version          - records: frozen row types, no SQL
- queue: register, claim, heartbeat, complete,  - pauses: provider state
  fail, release, windows and lag               - outbox: alert deliveries (the only
- incidents: found, acknowledged, event feed      importer of the alert plan)
- reports: read-only queries                   - recordings: archive paths for retention
- quarantine: unreadable rows                  - engines, watchers: the two databases
- bundle: every part at once (CLI, status, tests)

This file imports nothing, so a process that imports one part loads only what that part
needs. docs/queue.md ("How the store is laid out") says which process uses which part.
"""
