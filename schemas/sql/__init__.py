"""The system of record: database connections, tables, the store, the job state machine, ledgers."""
