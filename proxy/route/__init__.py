"""Where a command goes: the upstream topology, server selection and cursor pinning."""
