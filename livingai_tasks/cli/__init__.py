"""The `livingai-tasks` command line: main.py parses, commands.py acts, targets.py finds
the named app and store, render.py prints."""
