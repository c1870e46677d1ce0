"""``python -m sphero_lightning`` is the ``sphero`` command."""

from .commands.main import main

if __name__ == "__main__":
    main()
