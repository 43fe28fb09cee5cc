"""Adapters that run agent frameworks durably on the fleet, one room per framework. Each
imports its framework (an optional extra) and the Celery wing; nothing else imports them."""
