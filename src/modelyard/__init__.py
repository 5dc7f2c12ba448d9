"""modelyard: ML CI/CD as code."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("modelyard")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
