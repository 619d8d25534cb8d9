"""``python -m repsearch`` = the ``repsearch`` command."""

from repsearch.cli import main

main()
