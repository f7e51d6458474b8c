"""tcproxy: a local gateway for the TokenCheap API.

Importing any module of this package only defines names; nothing is opened, read or started.
"""

__version__ = "0.1.0"
