"""Training and evaluation datasets read from folders given on the command line."""
