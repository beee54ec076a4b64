"""`python -m ccm` runs the command line."""

from ccm.cli import main

main()
