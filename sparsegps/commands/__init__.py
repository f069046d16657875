"""One module per `sparsegps` subcommand: argument parsing and reporting around library calls."""
