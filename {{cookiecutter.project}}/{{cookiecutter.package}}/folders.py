"""The folders a job reads and writes, refused with a message when they cannot be used."""

import os
from pathlib import Path

from {{ cookiecutter.package }}.errors import UsageError


def writable_dir(path) -> Path:
    """Create the folder if needed; refuse one this user cannot write, with a message."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except PermissionError:
        pass
    except FileExistsError:
        raise UsageError(f"{path} is a file, not a folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(
            f"{path} is not writable by uid {os.getuid()}: "
            "on the host, chown the folder to the container's APP_UID (make dirs does)"
        )
    return Path(path)


def readable_dir(path) -> Path:
    """Refuse a data folder that is missing or that this user cannot read, with a message."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data directory {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"data directory {path} is not a directory")
    # Directory scans (pathlib, ImageFolder) skip folders they cannot read without a word.
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"data directory {path} is not readable by uid {os.getuid()}")
    return path
