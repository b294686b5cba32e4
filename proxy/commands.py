"""The proxy's one command vocabulary: names, aliases and classes of commands.

Every module that asks "what kind of command is this?" asks here, so the answer is the
same in classification, tenancy, routing, the cache, cursor tracking and the metrics.
Names are case-sensitive, as on the server (``Find`` is an unknown command); the
server's legacy spellings are mapped by :data:`ALIASES` to the canonical name once,
when the request is parsed (:func:`canonical`).
"""

from __future__ import annotations

__all__ = [
    "ADMIN_COMMANDS",
    "ALIASES",
    "AUTH_COMMANDS",
    "COLLECTION_COMMANDS",
    "CONTINUATIONS",
    "CURSOR_COMMANDS",
    "FILTERED_READS",
    "HELLO_COMMANDS",
    "KNOWN_COMMANDS",
    "NEVER_DENIED",
    "READ_COMMANDS",
    "SAFE_DATABASE_COMMANDS",
    "USER_ADMIN_COMMANDS",
    "WRITE_COMMANDS",
    "canonical",
]

# The server's legacy spellings -> the canonical name (one table for every module).
ALIASES = {
    "findandmodify": "findAndModify",
    "mapreduce": "mapReduce",
    "deleteIndexes": "dropIndexes",
    "ismaster": "isMaster",
    "buildinfo": "buildInfo",
    "dbstats": "dbStats",
}


def canonical(name: str) -> str:
    """The canonical name of a command (its alias resolved)."""
    return ALIASES.get(name, name)


# Handshake commands the proxy answers itself (as spelled on the wire: a hello reply
# differs with the spelling, so the raw name is kept for them).
HELLO_COMMANDS = frozenset({"hello", "isMaster", "ismaster"})

# Client authentication, answered by the proxy (proxy.identity.scram).
AUTH_COMMANDS = frozenset({"saslStart", "saslContinue", "authenticate", "logout"})

# Commands that only read, so a read preference may send them to a secondary
# (aggregate and mapReduce only when they have no output stage / inline output).
READ_COMMANDS = frozenset({
    "find", "aggregate", "count", "distinct", "mapReduce", "listCollections",
    "listIndexes", "listDatabases", "dbStats", "collStats", "dataSize", "geoSearch",
})  # explain: classified as the explained command

# The reads whose filter or pipeline the tenancy policy proves and the cache may key.
FILTERED_READS = frozenset({"find", "count", "distinct", "aggregate"})

USER_ADMIN_COMMANDS = frozenset({
    "createUser", "updateUser", "dropUser", "dropAllUsersFromDatabase",
    "grantRolesToUser", "revokeRolesFromUser", "createRole", "updateRole", "dropRole",
    "dropAllRolesFromDatabase", "grantPrivilegesToRole", "revokePrivilegesFromRole",
    "grantRolesToRole", "revokeRolesFromRole",
})

# Commands that always modify data or metadata (aggregate and mapReduce depend on
# their arguments and are decided by classify).
WRITE_COMMANDS = frozenset({
    # CRUD
    "insert", "update", "delete", "findAndModify", "bulkWrite",
    # collections, views, indexes
    "create", "drop", "dropDatabase", "createIndexes", "dropIndexes", "renameCollection",
    "collMod", "convertToCapped", "cloneCollectionAsCapped", "compact", "reIndex",
    "emptycapped", "createSearchIndexes", "updateSearchIndex", "dropSearchIndex",
    "cleanupOrphaned",
}) | USER_ADMIN_COMMANDS

# Handshake, authentication, sessions and server administration.
ADMIN_COMMANDS = frozenset({
    "hello", "isMaster", "saslStart", "saslContinue", "authenticate", "getnonce",
    "logout", "ping", "buildInfo", "connectionStatus", "whatsmyuri", "listCommands",
    "startSession", "endSessions", "refreshSessions", "killSessions", "killAllSessions",
    "killAllSessionsByPattern", "serverStatus", "hostInfo", "getCmdLineOpts", "getLog",
    "getParameter", "setParameter", "currentOp", "killOp", "fsync", "fsyncUnlock",
    "logRotate", "shutdown", "replSetGetStatus", "replSetGetConfig", "replSetStepDown",
    "getDefaultRWConcern", "setDefaultRWConcern", "setFeatureCompatibilityVersion",
    "usersInfo", "rolesInfo", "lockInfo", "top", "features", "profile",
}) | USER_ADMIN_COMMANDS

# Commands whose value (a string) names a collection of the command's database.
COLLECTION_COMMANDS = frozenset({
    "find", "aggregate", "count", "distinct", "mapReduce", "listIndexes", "collStats",
    "geoSearch", "insert", "update", "delete", "findAndModify", "create", "drop",
    "createIndexes", "dropIndexes", "collMod", "convertToCapped",
    "cloneCollectionAsCapped", "compact", "reIndex", "emptycapped", "validate",
    "killCursors", "createSearchIndexes", "updateSearchIndex", "dropSearchIndex",
})

# Cursor continuations: pinned to the server that opened the cursor.
CONTINUATIONS = frozenset({"getMore", "killCursors"})

# Commands whose reply may open a cursor (reply ``cursor.id`` != 0).
CURSOR_COMMANDS = frozenset({"find", "aggregate", "listCollections", "listIndexes", "getMore"})

# Connection housekeeping no tenancy rule refuses (handshake, sessions, transactions,
# listing): allowed on any database, and before authentication when users are declared.
SAFE_DATABASE_COMMANDS = frozenset({
    "hello", "isMaster", "ismaster", "ping", "buildInfo", "buildinfo", "saslStart",
    "saslContinue", "logout", "getnonce", "connectionStatus", "whatsmyuri",
    "startSession", "endSessions", "refreshSessions", "commitTransaction",
    "abortTransaction", "listCollections", "listDatabases", "getLastError",
})

# Never refused by a routing class's ``deny``: the connection could not work without them.
NEVER_DENIED = frozenset({
    "hello", "isMaster", "saslStart", "saslContinue", "authenticate", "getnonce",
    "logout", "ping", "endSessions", "buildInfo", "commitTransaction", "abortTransaction",
})

# Command names that get their own metric label (anything else is "other": clients
# choose names, and a label per name would be unbounded).
KNOWN_COMMANDS = frozenset({
    "abortTransaction", "aggregate", "authenticate", "buildInfo", "bulkWrite", "collMod",
    "collStats", "commitTransaction", "connectionStatus", "count", "create",
    "createIndexes", "createUser", "currentOp", "dbStats", "delete", "distinct", "drop",
    "dropDatabase", "dropIndexes", "endSessions", "explain", "find", "findAndModify",
    "findandmodify", "getCmdLineOpts", "getLog", "getMore", "getParameter", "hello",
    "hostInfo", "insert", "isMaster", "ismaster", "killAllSessions", "killCursors",
    "killOp", "killSessions", "listCollections", "listDatabases", "listIndexes",
    "listSearchIndexes", "logout", "mapReduce", "ping", "refreshSessions",
    "renameCollection", "saslContinue", "saslStart", "serverStatus", "setParameter",
    "startSession", "update", "validate", "whatsmyuri", "shardCollection",
    "createSearchIndexes", "dropSearchIndexes", "updateSearchIndex", "usersInfo",
    "rolesInfo", "dropUser", "updateUser", "getLastError", "replSetGetStatus",
})
