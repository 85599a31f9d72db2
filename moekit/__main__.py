"""`python -m moekit ...` is the `moekit` command."""

from moekit.cli import main

raise SystemExit(main())
