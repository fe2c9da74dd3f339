"""`python -m loha_train` runs the command line."""

from loha_train.cli import main

raise SystemExit(main())
