"""Revisions of the catalog schema, oldest first: 0001 = the schema before versioned indexes."""
