"""The command line: a thin face on the library (parse, call, render, map errors to exit codes)."""
