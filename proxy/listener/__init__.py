"""Client-facing I/O: the listening socket and one handler per client connection."""
