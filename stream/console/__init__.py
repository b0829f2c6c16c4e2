"""The web console: ``infogap console`` (docs/console.md)."""
