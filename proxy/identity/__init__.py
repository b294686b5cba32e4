"""Who the client is: the handshake it sends and, later, how it authenticates."""
