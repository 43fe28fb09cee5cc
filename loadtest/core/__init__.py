"""What every workload shares: servers, isolated stores, the run context, percentiles,
tables, the results writer, the machine's description, progress, the agent state, and
(library.py) the only imports of livingai_tasks internals."""
