"""``python -m dropspy``: the same as the ``dropspy`` command."""

from dropspy.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
