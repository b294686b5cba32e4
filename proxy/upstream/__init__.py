"""The one way to a server: :class:`~proxy.upstream.roundtrip.Roundtrip`."""
