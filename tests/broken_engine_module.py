"""A module that raises while it is imported, for the engine-table tests (a user's broken engine module)."""
raise RuntimeError("this module is broken on purpose")
