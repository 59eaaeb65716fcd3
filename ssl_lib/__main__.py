"""``python -m ssl_lib ...``: the ``ssl-lib`` command."""

from ssl_lib.cli import main

main()
