"""``python -m flowscore``: the same program as the ``flowscore`` console script."""

from ._main import main

if __name__ == "__main__":
    raise SystemExit(main())
