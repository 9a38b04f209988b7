"""CLI glue: one module per subcommand, each with configure(parser) and run(args) -> exit code.

These modules parse arguments, call the library, and print; they hold no logic of their own.
"""
