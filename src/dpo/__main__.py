"""``python -m dpo``."""

from dpo.cli import main

if __name__ == "__main__":
    main()
