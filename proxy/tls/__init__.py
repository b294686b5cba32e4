"""TLS on both sides of the proxy: the listener's (``listen.tls``), the upstream's (the
``tls*`` options of ``upstream.uri``, or a declared member's ``tls`` block) and Redis's
(``rediss://``)."""
