"""`python -m sectorfsm` runs the `sectors` CLI."""

from sectorfsm.cli.app import main

if __name__ == "__main__":
    main()
