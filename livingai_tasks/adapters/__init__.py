"""Framework adapters: run another framework's agent inside a step, its calls journaled.

Each adapter is a module of its own that imports its framework (an optional extra); nothing
in the core or the Celery wing imports an adapter, so `import livingai_tasks` never needs a
framework installed.
"""
