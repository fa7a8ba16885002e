"""ctbot's composition root: the ``ctbot`` command line and ctbot.wiring."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctbot")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
