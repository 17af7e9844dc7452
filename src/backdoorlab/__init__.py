"""backdoorlab: backdoor (data-poisoning) attacks and defenses, fast and tested.

The data flows one way: source -> tensors -> poison -> train -> (defend) -> evaluate -> store.
See ``docs/`` and the README for the architecture and measured figures.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("backdoorlab")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
