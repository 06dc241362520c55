"""Front ends: argument parsing, terminals and exit codes over the public client API."""
