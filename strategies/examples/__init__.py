"""Examples of user strategies; they are not imported by ``strategies`` (load them by path)."""
