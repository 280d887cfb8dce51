"""Built-in backends.  Each module is imported only when its backend is first named."""
