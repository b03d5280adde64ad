"""`python -m storelens ...` is the `storelens` console script."""

from storelens.cli import main

main()
