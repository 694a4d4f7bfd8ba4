"""fts TUI: a Textual cockpit that follows an fts-daemon run. Never imports torch or Lightning."""

__version__ = "0.1.0"
