"""The Celery wing: the only part of livingai_tasks that imports Celery.

A step's path: steps (the decorators and StepTask) -> signals (Celery's hooks) ->
lifecycle (the entry decision, the RUNNING record) -> outcomes (what the step ended as) ->
the engine. Recovery's path: beat -> tasks (the tick) -> recovery planning (core) ->
recover (claim, publish again) -> messages.
"""
