"""mongoproxy: an asyncio MongoDB wire-protocol proxy."""
