"""Adapters: run an agent framework's code durably on livingai_tasks, one room per framework.

The core and the Celery wing never import an adapter; each adapter imports its framework
itself and names the extra to install when it is missing.
"""
