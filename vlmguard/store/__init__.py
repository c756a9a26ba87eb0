"""The job table: every SQL statement vlmguard runs lives in this package.

One module per kind of caller, over one shared Database (database.py: the engine, read
and write transactions, wait_for_commit):

- schema: tables, migrations, version
- records: frozen row types and their range checks, no SQL
- queue: register, claim, heartbeat, complete, fail, release; windows and lag
- pauses: provider state shared by every analyzer
- outbox: alert deliveries (the only importer of the alert plan)
- incidents: found, counted, acknowledged; the event feed
- reports: read-only queries
- recordings: archive paths retention must keep
- quarantine: unreadable rows, marked once and skipped
- engines, watchers: what differs between SQLite and PostgreSQL
- bundle: every part at once (status report, web, CLI, tests)

This file imports nothing, so a process that imports one part loads only what that part
needs. docs/queue.md ("How the store is laid out") says which process uses which part.
"""
