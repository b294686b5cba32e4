"""explain-route: what the proxy would do with one command, without running it."""
